"""WanModel: parameter tables, pinned numerics, checkpoint round trips (CPU)."""
import json
import math
import os

import pytest
import torch

from wan.modules.model import (ForwardOptions, WanModel, apply_rope, rope_apply,
                               rope_apply_fast, rope_cos_sin, rope_freqs_table, rope_params,
                               sinusoidal_embedding_1d)
from wan.utils.checkpoint import CheckpointError
from wan.utils.random_init import build_on_meta

A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, freq_dim=256, in_dim=16,
            out_dim=16, eps=1e-6, text_len=512)
TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)


def tiny_model(seed=0, **kw):
    return WanModel.from_random(seed=seed, **{**TINY, **kw})


# ----------------------------------------------------------------------------- tables
def test_a14b_parameter_table():
    model = build_on_meta(lambda: WanModel(**A14B))
    sd = model.state_dict()
    assert len(sd) == 1095
    assert sum(v.numel() for v in sd.values()) == 14_288_491_584
    non_block = {
        'patch_embedding.weight': (5120, 16, 1, 2, 2), 'patch_embedding.bias': (5120,),
        'text_embedding.0.weight': (5120, 4096), 'text_embedding.0.bias': (5120,),
        'text_embedding.2.weight': (5120, 5120), 'text_embedding.2.bias': (5120,),
        'time_embedding.0.weight': (5120, 256), 'time_embedding.0.bias': (5120,),
        'time_embedding.2.weight': (5120, 5120), 'time_embedding.2.bias': (5120,),
        'time_projection.1.weight': (30720, 5120), 'time_projection.1.bias': (30720,),
        'head.modulation': (1, 2, 5120), 'head.head.weight': (64, 5120),
        'head.head.bias': (64,),
    }
    block = {'modulation': (1, 6, 5120), 'norm3.weight': (5120,), 'norm3.bias': (5120,),
             'ffn.0.weight': (13824, 5120), 'ffn.0.bias': (13824,),
             'ffn.2.weight': (5120, 13824), 'ffn.2.bias': (5120,)}
    for attn in ('self_attn', 'cross_attn'):
        for p in 'qkvo':
            block[f'{attn}.{p}.weight'] = (5120, 5120)
            block[f'{attn}.{p}.bias'] = (5120,)
        block[f'{attn}.norm_q.weight'] = (5120,)
        block[f'{attn}.norm_k.weight'] = (5120,)
    expected = dict(non_block)
    for i in range(40):
        expected.update({f'blocks.{i}.{k}': v for k, v in block.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(math.prod(v) for v in non_block.values()) == 232_719_424
    assert sum(math.prod(v) for v in block.values()) == 351_394_304
    # RoPE table: plain complex128 attribute, not in the checkpoint, never on meta
    assert model.freqs.shape == (1024, 64) and model.freqs.dtype == torch.complex128
    assert model.freqs.device.type == 'cpu'


# ----------------------------------------------------------------------------- numerics
def test_sinusoid_cos_first_float64():
    emb = sinusoidal_embedding_1d(4, torch.tensor([1.0, 2.0]))
    assert emb.dtype == torch.float64
    # half = 2: omega = (1, 10000^-0.5 = 0.01)
    expected = torch.tensor([[math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)],
                             [math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02)]],
                            dtype=torch.float64)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-15)


def test_rope_params():
    table = rope_params(4, 44)
    assert table.dtype == torch.complex128 and table.shape == (4, 22)
    # position 3, frequency j: angle 3 * 10000^(-2j/44), per-axis width 44
    for j in (0, 1, 21):
        angle = 3 * 10000 ** (-2 * j / 44)
        assert abs(table[3, j] - complex(math.cos(angle), math.sin(angle))) < 1e-12


def _one_pair_input(slot, seq, heads=1, head_dim=128):
    x = torch.zeros(1, seq, heads, head_dim)
    x[..., 2 * slot] = 1.0  # real part of complex slot `slot`, imaginary 0
    return x


@pytest.mark.parametrize('slot,axis,omega', [
    (0, 0, 1.0), (1, 0, 10000 ** (-2 / 44)), (21, 0, 10000 ** (-42 / 44)),
    (22, 1, 1.0), (23, 1, 10000 ** (-2 / 42)), (43, 2, 1.0), (63, 2, 10000 ** (-40 / 42))])
def test_rope_channel_split_and_pairing(slot, axis, omega):
    """Slots 0-21 rotate with the frame, 22-42 with the row, 43-63 with the column index;
    channels pair as (2j, 2j+1) = (real, imag)."""
    model = build_on_meta(lambda: WanModel(**A14B))
    grid = (3, 4, 5)
    seq = math.prod(grid)
    x = _one_pair_input(slot, seq + 2)  # two padding tokens pass through unrotated
    out = rope_apply(x, torch.tensor([grid]), model.freqs)
    assert out.dtype == torch.float32
    for f in range(3):
        for h in range(4):
            for w in range(5):
                tok = (f * 4 + h) * 5 + w
                angle = (f, h, w)[axis] * omega
                assert abs(out[0, tok, 0, 2 * slot] - math.cos(angle)) < 1e-6
                assert abs(out[0, tok, 0, 2 * slot + 1] - math.sin(angle)) < 1e-6
    assert torch.equal(out[0, seq:], x[0, seq:])
    # nothing leaks into other channels
    mask = torch.ones(128, dtype=torch.bool)
    mask[2 * slot:2 * slot + 2] = False
    assert out[0, :, 0, mask].abs().max() == 0


def test_rope_table_is_rope_apply_bit_for_bit():
    # the per-token complex table (padded with 1+0i) gives rope_apply's values exactly,
    # for samples of different grids and for padded tokens
    model = build_on_meta(lambda: WanModel(**A14B))
    grid = torch.tensor([[2, 3, 4], [1, 3, 4]])
    x = torch.randn(2, 26, 3, 128)
    ref = rope_apply(x, grid, model.freqs)
    out = apply_rope(x, rope_freqs_table(grid, model.freqs, 26), torch.bfloat16)
    assert out.dtype == torch.float32  # reference math: fp32 out whatever the kernel dtype
    assert torch.equal(out, ref)
    assert torch.equal(out[1, 12:], x[1, 12:])  # past the true length: unrotated


def test_rope_fast_matches_reference():
    model = build_on_meta(lambda: WanModel(**A14B))
    grid = torch.tensor([[2, 3, 4], [1, 3, 4]])
    x = torch.randn(2, 26, 3, 128)
    ref = rope_apply(x, grid, model.freqs)
    fast = rope_apply_fast(x, rope_cos_sin(grid, model.freqs, 26, torch.device('cpu')))
    torch.testing.assert_close(fast, ref, rtol=0, atol=2e-6)


def _block_with_stubs(model, captured):
    """Block 0 with self-attn returning ones, cross-attn and FFN returning zeros."""
    block = model.blocks[0]
    block.self_attn.forward = lambda x, *a, **k: (captured.setdefault('attn_in', x),
                                                  torch.ones_like(x))[1]
    block.cross_attn.forward = lambda x, *a, **k: torch.zeros_like(x)
    block.ffn.forward = lambda x: (captured.setdefault('ffn_in', x), torch.zeros_like(x))[1]
    return block


def test_modulation_order_and_gates():
    model = tiny_model()
    captured = {}
    block = _block_with_stubs(model, captured)
    d = model.dim
    with torch.no_grad():
        block.modulation.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0, 4.0, 0.25])
                               .view(1, 6, 1).expand(1, 6, d))
    x = torch.randn(1, 7, d)
    e = torch.zeros(1, 7, 6, d)
    rope = model.rope_table(torch.tensor([[1, 1, 7]]), 7, x.device)
    out = block(x.clone(), e, rope, torch.zeros(1, 512, d), None)
    ln = torch.nn.functional.layer_norm(x, (d,), eps=1e-6)
    # self-attn input: LN1(x) * (1 + scale_a=2) + shift_a=1
    torch.testing.assert_close(captured['attn_in'], ln * 3 + 1)
    # x + ones * gate_a (0.5); FFN input uses scale_f=4, shift_f=3 on LN2 of the new x
    x1 = x + 0.5
    torch.testing.assert_close(captured['ffn_in'],
                               torch.nn.functional.layer_norm(x1, (d,), eps=1e-6) * 5 + 3)
    torch.testing.assert_close(out, x1)  # FFN output 0 * gate_f
    assert out.dtype == torch.float32


def test_head_uses_e_with_shift_scale_order():
    model = tiny_model()
    head = model.head
    d = model.dim
    with torch.no_grad():
        head.modulation.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1).expand(1, 2, d))
    x = torch.randn(1, 5, d)
    e = torch.full((1, 5, d), 0.5)
    out = head(x, e)
    ln = torch.nn.functional.layer_norm(x, (d,), eps=1e-6)
    expected = head.head(ln * (1 + 2.5) + 1.5)
    torch.testing.assert_close(out, expected)


def test_context_zero_padded_before_text_mlp():
    model = tiny_model()
    captured = {}
    orig = model.blocks[0].forward

    def spy(x, e, rope, context, k_lens):
        captured['context'] = context
        return orig(x, e, rope, context, k_lens)

    model.blocks[0].forward = spy
    lat = [torch.randn(16, 2, 4, 4)]
    ctx = torch.randn(5, 32)
    out_short = model(lat, torch.tensor([500]), [ctx], seq_len=8)[0]
    ctx_emb = captured['context']
    assert ctx_emb.shape == (1, 512, model.dim)
    pad_row = model.text_embedding(torch.zeros(1, 32))[0]
    # pad rows are the MLP of zeros (non-zero), not zeros after the MLP
    assert pad_row.abs().max() > 0
    torch.testing.assert_close(ctx_emb[0, 5:], pad_row.expand(507, -1))
    # a context pre-padded with zeros to 512 gives the same result
    out_full = model(lat, torch.tensor([500]), [torch.cat([ctx, torch.zeros(507, 32)])],
                     seq_len=8)[0]
    torch.testing.assert_close(out_short, out_full)


def test_patchify_and_unpatchify_order():
    model = tiny_model()
    # unpatchify: head channels (pt, ph, pw, c) with c fastest
    grid = torch.tensor([[2, 3, 4]])
    tokens = torch.arange(2 * 3 * 4 * 64, dtype=torch.float32).view(1, 24, 64)
    out = model.unpatchify(tokens, grid)[0]
    assert out.shape == (16, 2, 6, 8)
    for (c, f, hh, ww) in [(0, 0, 0, 0), (5, 1, 3, 6), (15, 1, 5, 7), (3, 0, 4, 1)]:
        tok = (f * 3 + hh // 2) * 4 + ww // 2
        ch = ((0 * 2 + hh % 2) * 2 + ww % 2) * 16 + c
        assert out[c, f, hh, ww] == tokens[0, tok, ch]
    # patch embedding flattens (f, h, w) with f slowest
    lat = torch.randn(16, 2, 6, 8)
    emb = model.patch_embedding(lat[None])  # (1, dim, 2, 3, 4)
    flat = emb.flatten(2).transpose(1, 2)
    torch.testing.assert_close(flat[0, (1 * 3 + 2) * 4 + 3], emb[0, :, 1, 2, 3])


def test_seq_len_padding_and_assert():
    model = tiny_model()
    lat = [torch.randn(16, 1, 4, 4)]
    ctx = [torch.randn(3, 32)]
    a = model(lat, torch.tensor([10]), ctx, seq_len=4)[0]
    b = model(lat, torch.tensor([10]), ctx, seq_len=9)[0]  # 5 zero pad tokens, keys excluded
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        model(lat, torch.tensor([10]), ctx, seq_len=3)


def test_per_sample_time_and_fast_rope_equal_reference():
    model = tiny_model(seed=3)
    lat = [torch.randn(16, 3, 4, 6), torch.randn(16, 3, 4, 6)]
    ctx = [torch.randn(4, 32), torch.randn(9, 32)]
    t = torch.tensor([977, 977])
    model.set_options(ForwardOptions(attn_dtype=torch.float32))
    ref = model(lat, t, ctx, seq_len=18)
    for opts in (dict(per_sample_time=True), dict(fast_rope=True),
                 dict(per_sample_time=True, fast_rope=True)):
        model.set_options(ForwardOptions(attn_dtype=torch.float32, **opts))
        out = model(lat, t, ctx, seq_len=18)
        for r, o in zip(ref, out):
            assert ((o - r).norm() / r.norm()) < 1e-5, opts


def test_forward_passes_equal_separate_forwards_bit_for_bit():
    model = tiny_model(seed=5)
    lat = [torch.randn(16, 2, 4, 4)]
    ctx_a, ctx_b = [torch.randn(4, 32)], [torch.randn(7, 32)]
    t = torch.tensor([900])
    a = model(lat, t, ctx_a, seq_len=8)
    b = model(lat, t, ctx_b, seq_len=8)
    both = model.forward_passes([(lat, t, ctx_a), (lat, t, ctx_b)], seq_len=8)
    assert all(torch.equal(u, v) for u, v in zip(both[0] + both[1], a + b))


def test_block_runner_is_the_one_loop():
    from wan.modules.model import BlockRunner

    class Counting(BlockRunner):
        def __init__(self):
            self.calls = []

        def run_block(self, index, block, x, a):
            self.calls.append(index)
            return super().run_block(index, block, x, a)

    model = tiny_model(seed=6)
    lat, ctx, t = [torch.randn(16, 2, 4, 4)], [torch.randn(4, 32)], torch.tensor([500])
    ref = model(lat, t, ctx, seq_len=8)[0]
    model.block_runner = Counting()
    out = model.forward_passes([(lat, t, ctx), (lat, t, ctx)], seq_len=8)
    # block by block: every pass through block 0, then block 1
    assert model.block_runner.calls == [0, 0, 1, 1]
    assert torch.equal(out[0][0], ref) and torch.equal(out[1][0], ref)


def test_block_runner_frees_each_blocks_input():
    # the runner replaces the streams in the caller's list: once block 0 has returned, its
    # input (the bf16 embedding output, which block 0 promoted to an fp32 copy) is
    # referenced by nobody, so it is freed before block 1
    import weakref

    from wan.modules.model import BlockRunner

    class Watching(BlockRunner):
        def __init__(self):
            self.inputs, self.alive = [], []

        def run_block(self, index, block, x, a):
            self.alive.append([r() is not None for r in self.inputs])
            self.inputs.append(weakref.ref(x))
            return super().run_block(index, block, x, a)

    model = tiny_model(seed=6)
    lat, ctx, t = [torch.randn(16, 2, 4, 4)], [torch.randn(4, 32)], torch.tensor([500])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ref = model(lat, t, ctx, seq_len=8)[0]
        model.block_runner = Watching()
        out = model(lat, t, ctx, seq_len=8)[0]
    assert torch.equal(out, ref)
    assert model.block_runner.alive[1] == [False]  # block 0's input freed before block 1


def test_self_attention_casts_its_input_once_under_autocast():
    # q, k and v read one bf16 copy of the modulated input (what each linear would have
    # cast it to), and the output is unchanged
    from wan.modules.model import _autocast_input
    x = torch.randn(1, 8, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = _autocast_input(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x.bfloat16())
    assert _autocast_input(x) is x  # autocast off: untouched
    model = tiny_model(seed=6)
    attn = model.blocks[0].self_attn
    xm = torch.randn(1, 8, model.dim)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        q, k, v = attn.qkv(xm)
        ref_q = attn.norm_q(attn.q(xm)).view_as(q)
        ref_v = attn.v(xm).view_as(v)
    assert torch.equal(q, ref_q) and torch.equal(v, ref_v)


def test_block_updates_an_fp32_residual_in_place_and_promotes_bf16():
    model = tiny_model(seed=7)
    block = model.blocks[0]
    rope = model.rope_table(torch.tensor([[1, 2, 4]]), 8, torch.device('cpu'))
    e, ctx = torch.randn(1, 1, 6, model.dim), torch.randn(1, 512, model.dim)
    x = torch.randn(1, 8, model.dim)
    want = block(x.clone(), e, rope, ctx, None)
    out = block(x, e, rope, ctx, None)
    assert out is x and torch.equal(out, want)  # one residual buffer
    xb = x.bfloat16()
    out = block(xb, e, rope, ctx, None)
    assert out.dtype == torch.float32 and out is not xb  # block 0: an fp32 copy


@pytest.mark.parametrize('per_sample', [True, False])
def test_ffn_token_chunks_are_the_same_math(per_sample):
    model = tiny_model(seed=8)
    lat = [torch.randn(16, 3, 4, 6)]
    ctx, t = [torch.randn(4, 32)], torch.tensor([640])
    model.set_options(ForwardOptions(attn_dtype=torch.float32, per_sample_time=per_sample))
    whole = model(lat, t, ctx, seq_len=18)[0]
    calls = []
    h = model.blocks[1].ffn.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    model.set_options(ForwardOptions(attn_dtype=torch.float32, per_sample_time=per_sample,
                                     ffn_chunk_tokens=7))
    chunked = model(lat, t, ctx, seq_len=18)[0]
    h.remove()
    assert calls == [7, 7, 4]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_batch_equals_single_samples():
    model = tiny_model(seed=4)
    model.set_options(ForwardOptions(attn_dtype=torch.float32))
    lat = [torch.randn(16, 2, 4, 4), torch.randn(16, 2, 4, 4)]
    ctx = [torch.randn(4, 32), torch.randn(6, 32)]
    both = model(lat, torch.tensor([900, 900]), ctx, seq_len=8)
    for i in range(2):
        one = model([lat[i]], torch.tensor([900]), [ctx[i]], seq_len=8)[0]
        torch.testing.assert_close(both[i], one, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints
def test_random_init_deterministic():
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(),
                               c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.blocks[0].self_attn.q.weight, c.blocks[0].self_attn.q.weight)
    assert torch.all(a.blocks[0].self_attn.norm_q.weight == 1)
    assert a.head.head.weight.abs().max() > 0


def test_sharded_round_trip(tmp_path):
    model = tiny_model(seed=5)
    folder = tmp_path / 'ckpt' / 'low_noise_model'
    model.save_pretrained(str(folder), max_shard_bytes=60_000)
    index = json.loads((folder / 'diffusion_pytorch_model.safetensors.index.json').read_text())
    shards = sorted(set(index['weight_map'].values()))
    assert len(shards) > 1 and shards[0].startswith('diffusion_pytorch_model-00001-of-')
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['_class_name'] == 'WanModel' and cfg['dim'] == 64

    loaded = WanModel.from_pretrained(str(tmp_path / 'ckpt'), subfolder='low_noise_model')
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert v.dtype == w.dtype == torch.float32 and torch.equal(v, w), k
    lat, ctx = [torch.randn(16, 2, 4, 4)], [torch.randn(3, 32)]
    torch.testing.assert_close(model(lat, torch.tensor([5]), ctx, 8)[0],
                               loaded(lat, torch.tensor([5]), ctx, 8)[0], rtol=0, atol=0)

    bf16 = WanModel.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    for (k, v), w in zip(model.state_dict().items(), bf16.state_dict().values()):
        assert w.dtype == torch.bfloat16 and torch.equal(v.to(torch.bfloat16), w), k


def test_single_file_round_trip(tmp_path):
    model = tiny_model(seed=6)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / 'diffusion_pytorch_model.safetensors').exists()
    loaded = WanModel.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  loaded.state_dict().values()))


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match='nowhere'):
        WanModel.from_pretrained(str(tmp_path / 'nowhere'))
    folder = tmp_path / 'm'
    model.save_pretrained(str(folder), max_shard_bytes=60_000)
    # missing shard named with its path
    index = json.loads((folder / 'diffusion_pytorch_model.safetensors.index.json').read_text())
    shard = sorted(set(index['weight_map'].values()))[-1]
    data = (folder / shard).read_bytes()
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        WanModel.from_pretrained(str(folder))
    # corrupted shard
    (folder / shard).write_bytes(data[:100] + b'garbage' * 10)
    with pytest.raises(CheckpointError, match='cannot read'):
        WanModel.from_pretrained(str(folder))
    # missing config.json
    (folder / shard).write_bytes(data)
    os.rename(folder / 'config.json', folder / 'c.json')
    with pytest.raises(FileNotFoundError, match='config.json'):
        WanModel.from_pretrained(str(folder))
    os.rename(folder / 'c.json', folder / 'config.json')

    single = tmp_path / 's'
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(str(single))
    for mutate, pattern in [
        (lambda d: d.pop('head.head.bias'), 'missing tensors: 1 \\(head.head.bias\\)'),
        (lambda d: d.__setitem__('blocks.9.extra', torch.zeros(1)), 'unexpected.*blocks.9.extra'),
        (lambda d: d.__setitem__('head.head.bias', torch.zeros(3)),
         'mis-shaped.*head.head.bias: checkpoint \\(3,\\) vs model \\(64,\\)'),
    ]:
        bad = dict(sd)
        mutate(bad)
        save_file(bad, str(single / 'diffusion_pytorch_model.safetensors'))
        with pytest.raises(CheckpointError, match=pattern):
            WanModel.from_pretrained(str(single))
