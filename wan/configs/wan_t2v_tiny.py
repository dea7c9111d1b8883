"""A tiny twin of t2v-A14B for tests and the no-checkpoint demo.

Same architecture, schedule, boundary, guidance and negative prompt as t2v-A14B; only the
widths and depths shrink, so a full generate() (T5, both experts, solver, VAE decode, mp4)
runs on a 2-core CPU in seconds. The keys that do not exist in the A14B config
(`text_dim`, `t5_*` widths, `vae_dim`) size the tiny text encoder and VAE.
"""
from easydict import EasyDict

from .wan_t2v_A14B import t2v_A14B

t2v_tiny = EasyDict(t2v_A14B)
t2v_tiny.__name__ = 'Config: Wan T2V tiny (tests and demo)'
t2v_tiny.frame_num = 9

# tiny umT5: byte-level vocabulary fits in 384 rows
t2v_tiny.t5_vocab_size = 384
t2v_tiny.t5_dim = 32
t2v_tiny.t5_dim_attn = 32
t2v_tiny.t5_dim_ffn = 64
t2v_tiny.t5_num_heads = 4
t2v_tiny.t5_num_layers = 2
t2v_tiny.t5_num_buckets = 32

# tiny Wan2.1 VAE: same topology, base width 8 instead of 96
t2v_tiny.vae_dim = 8

# tiny DiT: head_dim 32 keeps the 3-axis RoPE split meaningful (12/10/10)
t2v_tiny.dim = 64
t2v_tiny.ffn_dim = 128
t2v_tiny.freq_dim = 256
t2v_tiny.num_heads = 2
t2v_tiny.num_layers = 2
t2v_tiny.text_dim = 32
