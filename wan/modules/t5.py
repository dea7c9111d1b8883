"""umT5-XXL text encoder (docs/TEXT_ENCODER.md), written in plain PyTorch.

Only the encoder is implemented: Wan2.2 T2V never instantiates the T5 decoder. Parameter
names and shapes follow the released `models_t5_umt5-xxl-enc-bf16.pth` exactly
(docs/TEXT_ENCODER.md#parameters), and the forward pass reproduces upstream Wan2.2's
wan/modules/t5.py arithmetic (docs/TEXT_ENCODER.md#forward-and-precision), including its
precision islands:

- no 1/sqrt(d) attention scaling (T5 folds it into the weights);
- padded keys get `finfo(dtype).min` added to their scores;
- softmax in fp32, cast back to the activation dtype;
- RMSNorm variance in fp32, cast to the weight dtype before the weight multiply;
- gated GELU (tanh form) computed in the activation dtype, gate branch on `gate.0`;
- each block owns its relative-position bias table (`shared_pos=False`).

Importing this module never touches CUDA: the default device of `T5EncoderModel` is resolved
when it is constructed (the upstream module fails on CPU-only machines,
docs/TEXT_ENCODER.md#placement).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from wan.modules.tokenizers import ByteTokenizer, HuggingfaceTokenizer
from wan.utils.checkpoint import load_tensors_, read_pth, require_file
from wan.utils.random_init import build_on_meta, init_random_weights_

__all__ = [
    'T5EncoderModel', 'umt5_xxl', 'T5Encoder', 'T5SelfAttentionBlock', 'T5Attention',
    'T5FeedForward', 'T5LayerNorm', 'T5RelativeEmbedding', 'GELU', 'relative_position_bucket',
    'fp16_clamp', 'UMT5_XXL_ARCH',
]

logger = logging.getLogger(__name__)

# Architecture of umT5-XXL (docs/TEXT_ENCODER.md#architecture). The decoder entry only exists
# for signature compatibility.
UMT5_XXL_ARCH: Dict[str, Any] = dict(
    vocab_size=256384,
    dim=4096,
    dim_attn=4096,
    dim_ffn=10240,
    num_heads=64,
    encoder_layers=24,
    decoder_layers=24,
    num_buckets=32,
    shared_pos=False,
    dropout=0.1,
)


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Pull fp16 infinities back into range, as the reference does after each residual add.

    Only fp16 can overflow here; for bf16/fp32 this is the identity (and skips the
    device-synchronising `isinf().any()` check entirely).
    """
    if x.dtype == torch.float16 and torch.isinf(x).any():
        clamp = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-clamp, max=clamp)
    return x


class GELU(nn.Module):
    """GELU, tanh approximation, written out so it runs in the input dtype (bf16 in Wan)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(
            math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5LayerNorm(nn.Module):
    """T5 RMSNorm: no mean subtraction, no bias, variance in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fp32 rsqrt promotes the product to fp32; the result is rounded to the weight's
        # (half) dtype *before* the weight multiply, exactly like the reference.
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128, bidirectional: bool = True) -> torch.Tensor:
    """Map relative positions (key - query) to T5 bucket indices
    (docs/TEXT_ENCODER.md#relative-position-buckets).

    Bidirectional: half of the buckets for rel <= 0, half (offset by num_buckets // 2) for
    rel > 0. Within a half, distances below max_exact = half // 2 get one bucket each; larger
    ones are spaced logarithmically up to `max_distance` and saturate at the last bucket. The
    log term is computed in fp32 and truncated with `.long()`, which decides the bucket at the
    exact powers of two, so the order of operations is kept as in the reference.
    """
    if bidirectional:
        num_buckets //= 2
        buckets = (rel_pos > 0).long() * num_buckets
        rel_pos = torch.abs(rel_pos)
    else:
        buckets = torch.zeros_like(rel_pos, dtype=torch.long)
        rel_pos = -torch.min(rel_pos, torch.zeros_like(rel_pos))

    max_exact = num_buckets // 2
    # log(0) = -inf for rel_pos == 0 is harmless: torch.where below discards those entries.
    rel_pos_large = max_exact + (
        torch.log(rel_pos.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)).long()
    rel_pos_large = torch.min(rel_pos_large, torch.full_like(rel_pos_large, num_buckets - 1))
    return buckets + torch.where(rel_pos < max_exact, rel_pos, rel_pos_large)


class T5RelativeEmbedding(nn.Module):
    """Learned relative-position bias: one scalar per (bucket, head)."""

    def __init__(self, num_buckets: int, num_heads: int, bidirectional: bool = True,
                 max_dist: int = 128) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.num_heads = num_heads
        self.bidirectional = bidirectional
        self.max_dist = max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        """Bias of shape (1, num_heads, lq, lk)."""
        device = self.embedding.weight.device
        rel_pos = (torch.arange(lk, device=device).unsqueeze(0)
                   - torch.arange(lq, device=device).unsqueeze(1))
        buckets = relative_position_bucket(rel_pos, self.num_buckets, self.max_dist,
                                           self.bidirectional)
        bias = self.embedding(buckets)  # (lq, lk, num_heads)
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()


class T5Attention(nn.Module):
    """Multi-head self-attention without biases and without score scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int, dropout: float = 0.1) -> None:
        if dim_attn % num_heads != 0:
            raise ValueError(f'dim_attn {dim_attn} is not divisible by num_heads {num_heads}')
        super().__init__()
        self.dim = dim
        self.dim_attn = dim_attn
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, dim); mask: (B, L) with 0 on padded keys; pos_bias: (1, heads, L, L)."""
        b, n, c = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, c)
        k = self.k(x).view(b, -1, n, c)
        v = self.v(x).view(b, -1, n, c)

        # The additive bias starts as zeros in the activation dtype; position bias and mask are
        # written into it in place, so both are rounded to that dtype like upstream
        # (docs/TEXT_ENCODER.md#forward-and-precision).
        attn_bias = x.new_zeros(b, n, q.size(1), k.size(1))
        if pos_bias is not None:
            attn_bias += pos_bias
        if mask is not None:
            mask = mask.view(b, 1, 1, -1) if mask.ndim == 2 else mask.unsqueeze(1)
            attn_bias.masked_fill_(mask == 0, torch.finfo(x.dtype).min)

        scores = torch.einsum('binc,bjnc->bnij', q, k) + attn_bias
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.einsum('bnij,bjnc->binc', attn, v)
        out = out.reshape(b, -1, n * c)
        return self.dropout(self.o(out))


class T5FeedForward(nn.Module):
    """Gated GELU FFN: fc2(fc1(x) * gelu_tanh(gate(x))). `gate` is Sequential(Linear, GELU)
    so that its weight is stored as `gate.0.weight`, as in the released checkpoint."""

    def __init__(self, dim: int, dim_ffn: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.dim_ffn = dim_ffn
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x) * self.gate(x)
        x = self.dropout(x)
        return self.dropout(self.fc2(x))


class T5SelfAttentionBlock(nn.Module):
    """Pre-norm encoder block: x += attn(norm1(x)); x += ffn(norm2(x))."""

    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int,
                 shared_pos: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        self.shared_pos = shared_pos
        self.norm1 = T5LayerNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads, dropout)
        self.norm2 = T5LayerNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn, dropout)
        # umT5 gives every block its own bias table; with shared_pos the encoder owns one.
        self.pos_embedding = (None if shared_pos else
                              T5RelativeEmbedding(num_buckets, num_heads, bidirectional=True))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pos_embedding is not None:
            # The bias covers the full (padded) length; pads are removed by the mask only.
            pos_bias = self.pos_embedding(x.size(1), x.size(1))
        x = fp16_clamp(x + self.attn(self.norm1(x), mask=mask, pos_bias=pos_bias))
        x = fp16_clamp(x + self.ffn(self.norm2(x)))
        return x


class T5Encoder(nn.Module):
    """umT5 encoder: embedding -> blocks -> final RMSNorm; forward(ids, mask) -> (B, L, dim)."""

    def __init__(self, vocab_size: int, dim: int, dim_attn: int, dim_ffn: int, num_heads: int,
                 num_layers: int, num_buckets: int, shared_pos: bool = False,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.dim_attn = dim_attn
        self.dim_ffn = dim_ffn
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_buckets = num_buckets
        self.shared_pos = shared_pos

        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embedding = (T5RelativeEmbedding(num_buckets, num_heads, bidirectional=True)
                              if shared_pos else None)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([
            T5SelfAttentionBlock(dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos,
                                 dropout) for _ in range(num_layers)
        ])
        self.norm = T5LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.dropout(self.token_embedding(ids))
        pos_bias = (self.pos_embedding(x.size(1), x.size(1))
                    if self.pos_embedding is not None else None)
        for block in self.blocks:
            x = block(x, mask, pos_bias=pos_bias)
        return self.dropout(self.norm(x))


def _meta_context_active() -> bool:
    """True inside `with torch.device('meta')`: factory functions then allocate nothing."""
    return torch.empty(0).device.type == 'meta'


def umt5_xxl(**kwargs: Any) -> Union[nn.Module, tuple]:
    """Build umT5-XXL (encoder only in this project), with the call keys of upstream Wan2.2's
    wan/modules/t5.py `umt5_xxl`.

    Architecture keys default to umT5-XXL and may be overridden (tiny encoders are built this
    way): vocab_size, dim, dim_attn, dim_ffn, num_heads, encoder_layers, decoder_layers,
    num_buckets, shared_pos, dropout. Call keys: encoder_only=False, decoder_only=False,
    return_tokenizer=False, tokenizer_kwargs={}, dtype=torch.float32, device='cpu'.

    Inside a `torch.device('meta')` context the model is built on meta (no allocation) and
    `device` is ignored; otherwise it is built directly on `device` and cast to `dtype`.
    Returns the encoder, or (encoder, HuggingfaceTokenizer('google/umt5-xxl', **tokenizer_kwargs))
    with return_tokenizer=True.
    """
    encoder_only = kwargs.pop('encoder_only', False)
    decoder_only = kwargs.pop('decoder_only', False)
    return_tokenizer = kwargs.pop('return_tokenizer', False)
    tokenizer_kwargs = kwargs.pop('tokenizer_kwargs', None) or {}
    dtype = kwargs.pop('dtype', torch.float32)
    device = kwargs.pop('device', 'cpu')

    unknown = sorted(set(kwargs) - set(UMT5_XXL_ARCH))
    if unknown:
        raise TypeError(f'umt5_xxl got unexpected keyword arguments: {unknown}')
    arch = {**UMT5_XXL_ARCH, **kwargs}

    if decoder_only or not encoder_only:
        # Wan2.2 T2V only ever uses the encoder; the decoder is deliberately not implemented.
        raise NotImplementedError(
            'only the umT5 encoder is implemented (Wan T2V never uses the decoder); call '
            'umt5_xxl(encoder_only=True, ...)')

    def factory() -> T5Encoder:
        return T5Encoder(vocab_size=arch['vocab_size'], dim=arch['dim'],
                         dim_attn=arch['dim_attn'], dim_ffn=arch['dim_ffn'],
                         num_heads=arch['num_heads'], num_layers=arch['encoder_layers'],
                         num_buckets=arch['num_buckets'], shared_pos=arch['shared_pos'],
                         dropout=arch['dropout'])

    if _meta_context_active():
        model = factory().to(dtype=dtype)
    else:
        with torch.device(device):
            model = factory()
        model = model.to(dtype=dtype)

    if return_tokenizer:
        tokenizer = HuggingfaceTokenizer('google/umt5-xxl', **tokenizer_kwargs)
        return model, tokenizer
    return model


def _default_device() -> torch.device:
    """Current CUDA device if there is one, else CPU (resolved at call time, never at import)."""
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable a caller's autocast: T5 runs with pure bf16 weights/activations
    (docs/TEXT_ENCODER.md#forward-and-precision)."""
    if device.type in ('cuda', 'cpu'):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class T5EncoderModel:
    """Tokenizer + umT5 encoder, producing Wan's per-prompt text context
    (docs/TEXT_ENCODER.md#from-t5-output-to-dit-context).

    Args:
        text_len: tokens per prompt after padding/truncation (512 in Wan).
        dtype: weight and activation dtype (bf16 in Wan).
        device: where to put the weights; None means the current CUDA device, or CPU when CUDA
            is absent (resolved here, not at import time).
        checkpoint_path: the `.pth` state dict (e.g. models_t5_umt5-xxl-enc-bf16.pth).
        tokenizer_path: the tokenizer folder (e.g. <ckpt>/google/umt5-xxl).
        shard_fn: optional FSDP wrapper, called as shard_fn(model, sync_module_states=False).
        arch: overrides of the umt5_xxl architecture keys (tiny test/demo encoders).
        random_init_seed: if not None, fill deterministic random weights instead of loading a
            checkpoint; then a missing tokenizer folder falls back to `ByteTokenizer`.
        source: instead of checkpoint_path, a `wan.utils.formats.ComponentSource` (another
            checkpoint layout: Diffusers text_encoder/, ComfyUI umt5 file), renamed on load.
    """

    def __init__(self, text_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: Optional[Union[torch.device, str, int]] = None,
                 checkpoint_path: Optional[str] = None, tokenizer_path: Optional[str] = None,
                 shard_fn: Optional[Callable[..., nn.Module]] = None, *,
                 arch: Optional[Dict[str, Any]] = None,
                 random_init_seed: Optional[int] = None,
                 source: Optional[Any] = None) -> None:
        self.text_len = text_len
        self.dtype = dtype
        self.device = _default_device() if device is None else torch.device(device)
        self.checkpoint_path = checkpoint_path
        self.tokenizer_path = tokenizer_path

        # Fail on missing files before building or reading anything large.
        if random_init_seed is None and source is None:
            if checkpoint_path is None:
                raise ValueError('T5EncoderModel needs checkpoint_path (or random_init_seed)')
            require_file(checkpoint_path, 'T5 checkpoint')
        elif random_init_seed is not None and checkpoint_path is not None:
            logger.info('random_init_seed=%d given: ignoring T5 checkpoint %s',
                        random_init_seed, checkpoint_path)

        if random_init_seed is not None and (tokenizer_path is None
                                             or not os.path.isdir(tokenizer_path)):
            logger.info('no tokenizer folder (%s): using the built-in byte-level tokenizer',
                        tokenizer_path)
            self.tokenizer = ByteTokenizer(seq_len=text_len, clean='whitespace')
        else:
            self.tokenizer = HuggingfaceTokenizer(name=tokenizer_path, seq_len=text_len,
                                                  clean='whitespace')

        model = build_on_meta(
            lambda: umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=dtype,
                             **(arch or {})))
        model.eval().requires_grad_(False)
        if random_init_seed is not None:
            init_random_weights_(model, seed=random_init_seed, device=self.device, dtype=dtype)
        elif source is not None:
            # another checkpoint layout (wan/utils/formats.py): its names mapped to ours
            load_tensors_(model, source.iter_tensors(), source=source.path, device=self.device,
                          dtype=dtype, rename=source.rename, transform=source.transform(dtype))
            logger.info('loaded T5 encoder from %s', source.describe())
        else:
            load_tensors_(model, read_pth(checkpoint_path).items(), source=checkpoint_path,
                          device=self.device, dtype=dtype)
            logger.info('loaded T5 encoder from %s', checkpoint_path)
        model.requires_grad_(False)
        self.model = model

        if shard_fn is not None:
            self.model = shard_fn(self.model, sync_module_states=False)

    def __call__(self, texts: Union[str, Sequence[str]],
                 device: Union[torch.device, str]) -> List[torch.Tensor]:
        """Encode prompts; returns one (true_len_i, dim) tensor per text (EOS included).

        The whole padded batch runs through the encoder with pad keys masked, then each output
        is cut to its true length. The model must already be on `device`.
        """
        ids, mask = self.tokenizer(texts, return_mask=True, add_special_tokens=True)
        ids = ids.to(device)
        mask = mask.to(device)
        seq_lens = mask.gt(0).sum(dim=1).long()
        with torch.no_grad(), _autocast_off(ids.device):
            context = self.model(ids, mask)
        return [u[:v] for u, v in zip(context, seq_lens)]
