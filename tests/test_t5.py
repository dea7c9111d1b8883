"""Tests for the umT5 text encoder and its tokenizers (docs/TEXT_ENCODER.md,
docs/PITFALLS.md#t5-details).

Everything runs on CPU with tiny encoders, except the umT5-XXL layout check which builds the
full encoder on the meta device (no allocation).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from wan.modules.t5 import (T5EncoderModel, T5LayerNorm, relative_position_bucket, umt5_xxl,
                            UMT5_XXL_ARCH)
from wan.modules.tokenizers import ByteTokenizer, HuggingfaceTokenizer, clean_text
from wan.utils.checkpoint import CheckpointError
from wan.utils.random_init import build_on_meta, init_random_weights_

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny encoder: byte-level vocabulary (259 ids) fits in 384 rows.
TINY = dict(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, encoder_layers=2,
            num_buckets=32)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

HF_VOCAB = ['<pad>', '</s>', '<unk>', 'a', 'b', 'c', 'hello', 'world', '&', 'the', 'cat']


@pytest.fixture(scope='session')
def hf_tokenizer_dir(tmp_path_factory) -> str:
    """A umT5-like tokenizer folder: <pad>=0, </s>=1, <unk>=2, EOS appended, no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(HF_VOCAB)}, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single='$A </s>', pair='$A </s> $B </s>', special_tokens=[('</s>', 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='</s>',
                                   unk_token='<unk>')
    folder = str(tmp_path_factory.mktemp('tokenizer') / 'umt5-tiny')
    fast.save_pretrained(folder)
    return folder


def tiny_encoder(seed: int = 0, dtype: torch.dtype = torch.float32, **arch) -> torch.nn.Module:
    model = build_on_meta(lambda: umt5_xxl(encoder_only=True, **{**TINY, **arch}))
    init_random_weights_(model, seed=seed, device='cpu', dtype=dtype)
    # init_random_weights_ sets every norm scale to 1; randomise them so that a mix-up of
    # norm1/norm2/norm would be visible.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition('.')[0].rpartition('.')[2] in ('norm', 'norm1', 'norm2'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------------------------

def test_umt5_xxl_layout_on_meta():
    model = build_on_meta(lambda: umt5_xxl(encoder_only=True, dtype=torch.bfloat16))
    sd = model.state_dict()
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in sd.values())
    assert len(sd) == 242
    assert sum(t.numel() for t in sd.values()) == 5_680_910_336

    expected = {'token_embedding.weight': (256384, 4096), 'norm.weight': (4096,)}
    for i in range(24):
        p = f'blocks.{i}.'
        expected[p + 'norm1.weight'] = (4096,)
        for n in 'qkvo':
            expected[p + f'attn.{n}.weight'] = (4096, 4096)
        expected[p + 'norm2.weight'] = (4096,)
        expected[p + 'ffn.gate.0.weight'] = (10240, 4096)
        expected[p + 'ffn.fc1.weight'] = (10240, 4096)
        expected[p + 'ffn.fc2.weight'] = (4096, 10240)
        expected[p + 'pos_embedding.embedding.weight'] = (32, 64)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_umt5_xxl_call_keys():
    with pytest.raises(NotImplementedError, match='encoder'):
        build_on_meta(lambda: umt5_xxl())
    with pytest.raises(NotImplementedError):
        build_on_meta(lambda: umt5_xxl(encoder_only=True, decoder_only=True))
    with pytest.raises(TypeError, match='bogus'):
        build_on_meta(lambda: umt5_xxl(encoder_only=True, bogus=1))
    # Outside a meta context the model is real, on `device`, in `dtype`, with overrides applied.
    model = umt5_xxl(encoder_only=True, dtype=torch.bfloat16, device='cpu', **TINY)
    assert model.token_embedding.weight.shape == (384, 32)
    assert model.token_embedding.weight.device.type == 'cpu'
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model.blocks) == 2
    assert UMT5_XXL_ARCH['shared_pos'] is False
    # shared_pos=True (plain T5 layout): one table owned by the encoder, none in the blocks
    shared = umt5_xxl(encoder_only=True, shared_pos=True, **TINY).eval()
    names = set(shared.state_dict())
    assert 'pos_embedding.embedding.weight' in names
    assert not any(n.startswith('blocks.') and 'pos_embedding' in n for n in names)
    with torch.no_grad():
        assert shared(torch.tensor([[4, 5, 1]])).shape == (1, 3, 32)


# Hand-computed buckets (num_buckets=32 -> 16 per side, max_exact=8, max_distance=128):
#   rel <= 0 -> base 0, rel > 0 -> base 16; r = |rel|
#   r < 8  -> base + r
#   r >= 8 -> base + min(15, 8 + trunc(ln(r/8) / ln(16) * 8))
#     r=8:   ln(1)=0                       -> 8
#     r=12:  ln(1.5)/ln16*8 = 1.17         -> 9
#     r=16:  ln(2)/ln16*8   = 2 (exact)    -> 10
#     r=22:  ln(2.75)/ln16*8 = 2.92        -> 10
#     r=23:  ln(2.875)/ln16*8 = 3.05       -> 11
#     r=32:  ln(4)/ln16*8   = 4            -> 12
#     r=64:  ln(8)/ln16*8   = 6            -> 14
#     r=90:  ln(11.25)/ln16*8 = 6.98       -> 14
#     r=91:  ln(11.375)/ln16*8 = 7.016     -> 15
#     r=128: 8 -> 16, capped               -> 15
#     r=200: > 8, capped                   -> 15
BUCKETS = {
    0: 0, -1: 1, 1: 17, -7: 7, 7: 23, -8: 8, 8: 24, -12: 9, 12: 25, -16: 10, 16: 26,
    -22: 10, 22: 26, -23: 11, 23: 27, -32: 12, 32: 28, -64: 14, 64: 30, -90: 14, 90: 30,
    -91: 15, 91: 31, -128: 15, 128: 31, -200: 15, 200: 31, -5000: 15, 5000: 31,
}


def test_relative_position_buckets():
    rel = torch.tensor(list(BUCKETS))
    got = relative_position_bucket(rel, num_buckets=32, max_distance=128, bidirectional=True)
    assert got.dtype == torch.long
    assert dict(zip(rel.tolist(), got.tolist())) == BUCKETS


def test_position_bias_is_per_layer_and_key_minus_query():
    model = tiny_encoder()
    tables = [b.pos_embedding.embedding.weight for b in model.blocks]
    assert not torch.equal(tables[0], tables[1])  # each block owns its table
    bias = model.blocks[0].pos_embedding(5, 7)
    assert bias.shape == (1, 4, 5, 7)
    # query 1, key 4: rel = +3 -> bucket 19; query 4, key 1: rel = -3 -> bucket 3
    assert torch.equal(bias[0, :, 1, 4], tables[0][19])
    assert torch.equal(bias[0, :, 4, 1], tables[0][3])


def test_rmsnorm_fp32_variance_then_cast_before_weight():
    norm = T5LayerNorm(8).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = (torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 30).to(torch.bfloat16)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
                              ).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# numerical equivalence with Hugging Face UMT5
# ---------------------------------------------------------------------------------------------

def _hf_umt5(model: torch.nn.Module, arch: dict):
    from transformers import UMT5Config, UMT5EncoderModel
    config = UMT5Config(
        vocab_size=arch['vocab_size'], d_model=arch['dim'],
        d_kv=arch['dim_attn'] // arch['num_heads'], d_ff=arch['dim_ffn'],
        num_layers=arch['encoder_layers'], num_heads=arch['num_heads'],
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj='gated-gelu')
    assert config.dense_act_fn == 'gelu_new'
    # Eager attention: the explicit matmul/softmax path (SDPA would round differently in bf16).
    config._attn_implementation = 'eager'
    hf = UMT5EncoderModel(config)
    attn = hf.encoder.block[0].layer[0].SelfAttention
    assert attn.config._attn_implementation == 'eager'

    ours = model.state_dict()
    mapped = {'shared.weight': ours['token_embedding.weight'],
              'encoder.embed_tokens.weight': ours['token_embedding.weight'],
              'encoder.final_layer_norm.weight': ours['norm.weight']}
    for i in range(arch['encoder_layers']):
        src, dst = f'blocks.{i}.', f'encoder.block.{i}.layer.'
        for n in 'qkvo':
            mapped[dst + f'0.SelfAttention.{n}.weight'] = ours[src + f'attn.{n}.weight']
        mapped[dst + '0.SelfAttention.relative_attention_bias.weight'] = \
            ours[src + 'pos_embedding.embedding.weight']
        mapped[dst + '0.layer_norm.weight'] = ours[src + 'norm1.weight']
        mapped[dst + '1.DenseReluDense.wi_0.weight'] = ours[src + 'ffn.gate.0.weight']
        mapped[dst + '1.DenseReluDense.wi_1.weight'] = ours[src + 'ffn.fc1.weight']
        mapped[dst + '1.DenseReluDense.wo.weight'] = ours[src + 'ffn.fc2.weight']
        mapped[dst + '1.layer_norm.weight'] = ours[src + 'norm2.weight']
    assert set(mapped) == set(hf.state_dict()), 'weight mapping does not cover HF UMT5'
    hf.load_state_dict(mapped, strict=True)
    return hf.to(next(model.parameters()).dtype).eval()


@pytest.mark.parametrize('dim_attn', [32, 48])
def test_matches_hf_umt5_fp32(dim_attn):
    arch = {**TINY, 'dim_attn': dim_attn, 'vocab_size': 200}
    model = tiny_encoder(seed=3, **arch)
    hf = _hf_umt5(model, {**UMT5_XXL_ARCH, **arch})

    # 150 positions: relative distances beyond max_distance=128 hit the saturated buckets.
    length = 150
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, arch['vocab_size'], (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 110:] = 0
    ids[1, 110:] = 0

    with torch.no_grad():
        ours = model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.shape == (2, length, 32)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_matches_hf_umt5_bf16_bit_exact():
    """bf16: eager HF UMT5 has the same rounding points as the reference (RMSNorm cast before
    the weight multiply, explicit tanh-GELU in bf16, bias added to the bf16 scores), so on CPU
    the outputs agree bit for bit."""
    model = tiny_encoder(seed=5, dtype=torch.bfloat16)
    hf = _hf_umt5(model, {**UMT5_XXL_ARCH, **TINY})
    ids = torch.randint(3, 384, (2, 60), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 45:] = 0
    with torch.no_grad():
        ours = model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.dtype == ref.dtype == torch.bfloat16
    valid = mask.bool()
    assert torch.equal(ours[valid], ref[valid])


def test_softmax_runs_in_fp32(monkeypatch):
    seen = []
    softmax = torch.nn.functional.softmax

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'softmax', spy)
    model = tiny_encoder(dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7, 1]]), torch.ones(1, 4, dtype=torch.long))
    assert out.dtype == torch.bfloat16
    assert seen == [torch.float32] * TINY['encoder_layers']


# ---------------------------------------------------------------------------------------------
# T5EncoderModel: trimming, autocast, device, checkpoint loading
# ---------------------------------------------------------------------------------------------

def test_trims_to_true_length_and_matches_unpadded_compute():
    enc = T5EncoderModel(text_len=48, dtype=torch.float32, device='cpu', arch=TINY,
                         random_init_seed=11)
    assert isinstance(enc.tokenizer, ByteTokenizer)
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())

    texts = ['hello', '  a   longer\tprompt, with more bytes  ']
    outs = enc(texts, device='cpu')
    true_lens = [len('hello') + 1, len('a longer prompt, with more bytes') + 1]  # + EOS
    assert [tuple(o.shape) for o in outs] == [(n, 32) for n in true_lens]

    ids, mask = enc.tokenizer(texts, return_mask=True)
    with torch.no_grad():
        padded = enc.model(ids, mask)
        for i, n in enumerate(true_lens):
            assert torch.equal(outs[i], padded[i, :n])
            short = enc.model(ids[i:i + 1, :n], mask[i:i + 1, :n])[0]
            torch.testing.assert_close(short, outs[i], rtol=1e-5, atol=1e-5)


def test_runs_outside_caller_autocast():
    enc = T5EncoderModel(text_len=16, dtype=torch.float32, device='cpu', arch=TINY,
                         random_init_seed=2)
    plain = enc(['a cat'], device='cpu')[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inside = enc(['a cat'], device='cpu')[0]
    assert inside.dtype == torch.float32
    assert torch.equal(plain, inside)


def test_bf16_encoder_and_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    enc = T5EncoderModel(text_len=16, dtype=torch.bfloat16, arch=TINY, random_init_seed=4)
    assert enc.device == torch.device('cpu')
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    out = enc('hello world', device='cpu')
    assert len(out) == 1 and out[0].shape == (12, 32) and out[0].dtype == torch.bfloat16
    assert torch.isfinite(out[0].float()).all()


def test_random_init_is_deterministic():
    a = T5EncoderModel(text_len=8, dtype=torch.float32, device='cpu', arch=TINY,
                       random_init_seed=9)
    b = T5EncoderModel(text_len=8, dtype=torch.float32, device='cpu', arch=TINY,
                       random_init_seed=9)
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), n


def test_shard_fn_is_applied():
    calls = []

    def shard_fn(model, **kwargs):
        calls.append(kwargs)
        return model

    enc = T5EncoderModel(text_len=8, dtype=torch.float32, device='cpu', arch=TINY,
                         random_init_seed=1, shard_fn=shard_fn)
    assert calls == [{'sync_module_states': False}]
    assert enc.model is not None


def _tiny_bf16_checkpoint(path) -> dict:
    enc = T5EncoderModel(text_len=16, dtype=torch.bfloat16, device='cpu', arch=TINY,
                         random_init_seed=21)
    sd = {k: v.clone() for k, v in enc.model.state_dict().items()}
    torch.save(sd, path)
    return sd


def test_checkpoint_round_trip_bit_exact(tmp_path, hf_tokenizer_dir):
    path = tmp_path / 'models_t5_tiny-enc-bf16.pth'
    saved = _tiny_bf16_checkpoint(path)
    enc = T5EncoderModel(text_len=16, dtype=torch.bfloat16, device='cpu',
                         checkpoint_path=str(path), tokenizer_path=hf_tokenizer_dir, arch=TINY)
    assert isinstance(enc.tokenizer, HuggingfaceTokenizer)
    loaded = enc.model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor), name
    assert not any(p.requires_grad for p in enc.model.parameters())
    out = enc(['hello world', 'the cat'], device='cpu')
    assert [tuple(o.shape) for o in out] == [(3, 32), (3, 32)]


def test_missing_checkpoint_names_path(tmp_path, hf_tokenizer_dir):
    missing = tmp_path / 'nope' / 'models_t5_umt5-xxl-enc-bf16.pth'
    with pytest.raises(FileNotFoundError, match=str(missing)):
        T5EncoderModel(text_len=16, checkpoint_path=str(missing),
                       tokenizer_path=hf_tokenizer_dir, arch=TINY, device='cpu')


def test_missing_checkpoint_checked_before_anything_else(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('built a model before checking the checkpoint path')

    monkeypatch.setattr('wan.modules.t5.build_on_meta', fail)
    missing = tmp_path / 'models_t5_umt5-xxl-enc-bf16.pth'
    # the tokenizer folder is missing too: the checkpoint must be the one reported
    with pytest.raises(FileNotFoundError, match=str(missing)):
        T5EncoderModel(text_len=16, checkpoint_path=str(missing),
                       tokenizer_path=str(tmp_path / 'no-tokenizer'), arch=TINY, device='cpu')


def test_corrupted_checkpoint(tmp_path, hf_tokenizer_dir):
    path = tmp_path / 'broken.pth'
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        T5EncoderModel(text_len=16, checkpoint_path=str(path), tokenizer_path=hf_tokenizer_dir,
                       arch=TINY, device='cpu')


@pytest.mark.parametrize('damage, name', [
    ('shape', 'blocks.1.attn.q.weight'),
    ('missing', 'blocks.0.ffn.gate.0.weight'),
    ('extra', 'blocks.0.ffn.gate.1.weight'),
])
def test_mismatched_checkpoint_names_tensor(tmp_path, hf_tokenizer_dir, damage, name):
    path = tmp_path / 'bad.pth'
    sd = _tiny_bf16_checkpoint(path)
    if damage == 'shape':
        sd[name] = torch.zeros(32, 16, dtype=torch.bfloat16)
    elif damage == 'missing':
        del sd[name]
    else:
        sd[name] = torch.zeros(64, 32, dtype=torch.bfloat16)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=name.replace('.', r'\.')):
        T5EncoderModel(text_len=16, checkpoint_path=str(path), tokenizer_path=hf_tokenizer_dir,
                       arch=TINY, device='cpu')


def test_checkpoint_required_without_random_init(hf_tokenizer_dir):
    with pytest.raises(ValueError, match='checkpoint_path'):
        T5EncoderModel(text_len=16, tokenizer_path=hf_tokenizer_dir, arch=TINY, device='cpu')


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------

def test_whitespace_clean():
    assert clean_text('  a&amp;amp;b \n\t c  ', 'whitespace') == 'a&b c'
    # ftfy leaves entities alone when the text contains '<'; html.unescape must run twice.
    assert clean_text('<b> a&amp;amp;b </b>', 'whitespace') == '<b> a&b </b>'
    assert clean_text('Hello,   World!', 'whitespace') == 'Hello, World!'  # no lower-casing
    assert clean_text('Hello,   World!', 'lower') == 'hello, world!'
    assert clean_text('Hello_there,   World!', 'canonicalize') == 'hello there world'
    assert clean_text('  keep  as is ', None) == '  keep  as is '
    with pytest.raises(ValueError):
        clean_text('x', 'bogus')


def test_hf_tokenizer_pads_and_masks(hf_tokenizer_dir):
    tok = HuggingfaceTokenizer(hf_tokenizer_dir, seq_len=16, clean='whitespace')
    ids, mask = tok(['hello   world', ' the\ncat &amp;amp; a '], return_mask=True)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.long
    v = {w: i for i, w in enumerate(HF_VOCAB)}
    assert ids[0, :3].tolist() == [v['hello'], v['world'], 1]
    assert ids[1, :6].tolist() == [v['the'], v['cat'], v['&'], v['a'], 1, 0]
    assert (ids[0, 3:] == 0).all() and (ids[1, 5:] == 0).all()
    assert mask.sum(1).tolist() == [3, 5]
    assert (mask[0, :3] == 1).all() and (mask[0, 3:] == 0).all()
    # a single string is a batch of one; without the mask only ids come back
    single = tok('hello')
    assert single.shape == (1, 16) and single[0, :2].tolist() == [v['hello'], 1]
    # truncation keeps EOS as the last of seq_len tokens
    long_ids, long_mask = tok(' '.join(['a'] * 40), return_mask=True)
    assert long_ids[0, -1].item() == 1 and long_mask.sum().item() == 16


def test_hf_tokenizer_missing_folder(tmp_path):
    missing = tmp_path / 'google' / 'umt5-xxl'
    with pytest.raises(FileNotFoundError, match=str(missing)):
        HuggingfaceTokenizer(str(missing), seq_len=16, clean='whitespace')


def test_hf_tokenizer_missing_relative_name_never_downloads(tmp_path, monkeypatch):
    # A relative hub-style name that is neither a folder nor in the local cache: a clear
    # FileNotFoundError naming the folder looked for (local_files_only, so no network).
    monkeypatch.chdir(tmp_path)
    name = os.path.join('no-such-org', 'no-such-umt5-tokenizer')
    with pytest.raises(FileNotFoundError, match=str(tmp_path / name)):
        HuggingfaceTokenizer(name, seq_len=16, clean='whitespace')


def test_t5_encoder_model_missing_tokenizer_folder(tmp_path):
    ckpt = tmp_path / 't5.pth'
    _tiny_bf16_checkpoint(ckpt)
    missing = tmp_path / 'google' / 'umt5-xxl'
    with pytest.raises(FileNotFoundError, match=str(missing)):
        T5EncoderModel(text_len=16, checkpoint_path=str(ckpt), tokenizer_path=str(missing),
                       arch=TINY, device='cpu')


def test_byte_tokenizer():
    tok = ByteTokenizer(seq_len=8)
    assert tok.vocab_size == 259
    ids, mask = tok(['ab', ' \t é '], return_mask=True)
    # 'a' = 97 -> 100, 'b' = 98 -> 101, EOS 1, pad 0; 'é' is two utf-8 bytes (0xC3 0xA9)
    assert ids[0].tolist() == [100, 101, 1, 0, 0, 0, 0, 0]
    assert ids[1].tolist() == [0xC3 + 3, 0xA9 + 3, 1, 0, 0, 0, 0, 0]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    # truncation: at most seq_len tokens, EOS kept last
    long_ids, long_mask = tok('abcdefghijkl', return_mask=True)
    assert long_ids[0].tolist() == [100, 101, 102, 103, 104, 105, 106, 1]
    assert long_mask.sum().item() == 8
    # without seq_len: pad to the longest text; without special tokens: no EOS
    free = ByteTokenizer()
    assert free(['a', 'abc']).tolist() == [[100, 1, 0, 0], [100, 101, 102, 1]]
    assert free('ab', add_special_tokens=False).tolist() == [[100, 101]]


def test_random_init_prefers_existing_tokenizer_folder(hf_tokenizer_dir, tmp_path):
    enc = T5EncoderModel(text_len=16, dtype=torch.float32, device='cpu', arch=TINY,
                         random_init_seed=0, tokenizer_path=hf_tokenizer_dir)
    assert isinstance(enc.tokenizer, HuggingfaceTokenizer)
    enc = T5EncoderModel(text_len=16, dtype=torch.float32, device='cpu', arch=TINY,
                         random_init_seed=0, tokenizer_path=str(tmp_path / 'absent'),
                         checkpoint_path=str(tmp_path / 'absent.pth'))
    assert isinstance(enc.tokenizer, ByteTokenizer)


# ---------------------------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------------------------

def test_import_does_not_touch_cuda():
    code = (
        'import torch\n'
        'def boom(*a, **k):\n'
        '    raise RuntimeError("CUDA touched at import")\n'
        'torch.cuda.is_available = boom\n'
        'torch.cuda.current_device = boom\n'
        'torch.cuda.device_count = boom\n'
        'torch.cuda.init = boom\n'
        'import wan.modules.t5, wan.modules.tokenizers\n'
        'print("ok")\n')
    env = {**os.environ, 'PYTHONPATH': REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == 'ok'
