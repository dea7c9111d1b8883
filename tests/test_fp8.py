"""fp8 library parts (wan/modules/fp8.py) on the CPU: scale maths, Fp8Linear error, module swap,
attention quantization emulation, bf16-step schedule.

Error bounds and where they come from: e4m3 keeps 3 mantissa bits, so rounding one element
costs up to 2^-4 of its value, about 2.6% RMS on Gaussian data. A dot product of two such
quantized vectors sums independent errors, so its relative error stays near
sqrt(2) * 2.6% ~ 3.7% whatever the length (measured here: 3.5-3.7% for K = 64..2048). The bound
0.05 leaves ~35% margin and still fails by a factor 20 for a scale off by 2x (error 100%) or a
transposed weight (error ~140%).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.modules.fp8 import (FP8_DTYPE, MIN_SCALE, QUANTIZE_PARTS, Fp8Linear, Fp8Schedule,
                             dequantize, expand_parts, fp8_attention,
                             fp8_attention_available, fp8_attention_reference,
                             quantize_attention_inputs, quantize_rowwise, smooth_keys,
                             swap_linears_)
from wan.modules.model import WanModel

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
LINEAR_BOUND = 0.05


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- quantization
def test_rowwise_scale_hand_checked():
    x = torch.tensor([[448., -224., 0.], [0., 0., 0.], [1., -2., 0.5], [900., 1., -448.]])
    q, s = quantize_rowwise(x)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (4, 1)
    # row 0: amax 448 -> scale 1, values exact in e4m3
    assert s[0, 0] == 1.0
    assert q[0].float().tolist() == [448., -224., 0.]
    # row 1: zeros -> the floor scale, zeros out, no NaN
    assert s[1, 0] == MIN_SCALE and q[1].float().tolist() == [0., 0., 0.]
    # row 2: amax 2 -> scale 2/448; 2 maps to 448, 1 to 224, 0.5 to 112: all exact in e4m3
    assert s[2, 0].item() == pytest.approx(2 / 448, rel=1e-7)
    assert q[2].float().tolist() == [224., -448., 112.]
    torch.testing.assert_close(dequantize(q[2], s[2]), x[2], rtol=1e-6, atol=0)
    # row 3: amax 900 sets the scale; 1 * 448/900 = 0.4978 rounds to 0.5 (e4m3 has 3 bits)
    assert q[3].float().tolist() == [448., 0.5, -224.]


def test_values_beyond_range_clamp_before_cast():
    # a scale smaller than amax/448 (as a caller-provided scale could be) must saturate,
    # never produce NaN: quantize_rowwise clamps to +-448 before the cast
    x = torch.tensor([[1000., -1000., 3.]])
    q, s = quantize_rowwise(x)
    assert not torch.isnan(q.float()).any()
    assert q.float().abs().max() == 448.0
    # e4m3fn has no infinity: the clamp is what keeps an fp32 value a hair above 448 finite
    over = torch.tensor([448.0001, -448.0001]).clamp(-448, 448).to(FP8_DTYPE).float()
    assert over.tolist() == [448., -448.]


def test_per_channel_and_per_head_dims():
    torch.manual_seed(0)
    w = torch.randn(8, 32) * torch.logspace(-3, 3, 8).unsqueeze(1)  # rows of very different size
    q, s = quantize_rowwise(w)
    torch.testing.assert_close(s.squeeze(1), w.abs().amax(1) / 448)
    # every row uses the top of the e4m3 range: one element per row maps to +-448
    assert torch.all(q.float().abs().amax(1) == 448)
    # per-element relative error of e4m3 rounding: <= 2^-4 for normal numbers
    back = dequantize(q, s)
    normal = w.abs() >= s * 2 ** -6  # e4m3 normals: |x / scale| >= 2^-6
    assert ((back - w).abs()[normal] / w.abs()[normal]).max() <= 2 ** -4 + 1e-6
    # (B, L, H, D) reduced over (1, 3): one scale per (batch, head)
    x = torch.randn(2, 5, 3, 4)
    x[1, :, 2] *= 100
    _, s = quantize_rowwise(x, dim=(1, 3))
    assert s.shape == (2, 1, 3, 1)
    torch.testing.assert_close(s[:, 0, :, 0], x.abs().amax(dim=(1, 3)) / 448)


# ----------------------------------------------------------------------------- Fp8Linear
@pytest.mark.parametrize('k,n', [(64, 128), (512, 256), (1024, 64)])
def test_fp8_linear_matches_bf16_linear(k, n):
    torch.manual_seed(k + n)
    lin = nn.Linear(k, n)
    nn.init.normal_(lin.bias, std=0.5)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(2, 37, k)  # fp32 input, leading dims, an odd token count
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_bf16 = lin(x)
        y_fp8 = fp8(x)
    assert y_fp8.dtype == torch.bfloat16 and y_fp8.shape == (2, 37, n)
    err = rel(y_fp8, exact)
    assert 0.01 < err < LINEAR_BOUND, err  # lossy, but within e4m3's expected error
    assert rel(y_bf16, exact) < 0.005      # the bf16 linear is an order of magnitude closer
    assert rel(y_fp8, y_bf16) < LINEAR_BOUND
    # bf16 input, no autocast: same result class
    assert rel(fp8(x.bfloat16()), exact) < LINEAR_BOUND


def test_fp8_linear_bound_catches_wrong_scale_and_transpose():
    torch.manual_seed(3)
    lin = nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256)
    exact = x.double() @ lin.weight.double().t()
    good = Fp8Linear.from_linear(lin)
    assert rel(good(x), exact) < LINEAR_BOUND
    w8, s = quantize_rowwise(lin.weight.detach())
    assert rel(Fp8Linear.from_quantized(w8, s * 2)(x), exact) > 20 * LINEAR_BOUND
    assert rel(Fp8Linear.from_quantized(w8, s / 2)(x), exact) > 10 * LINEAR_BOUND
    w8t, st = quantize_rowwise(lin.weight.detach().t().contiguous())
    assert rel(Fp8Linear.from_quantized(w8t, st)(x), exact) > 20 * LINEAR_BOUND


def test_from_quantized_scale_shapes_and_errors():
    torch.manual_seed(4)
    w = torch.randn(32, 16)
    w8, s = quantize_rowwise(w)
    bias = torch.randn(32)
    x = torch.randn(5, 16)
    per_channel = Fp8Linear.from_quantized(w8, s.squeeze(1), bias)  # (out,) scale accepted
    torch.testing.assert_close(per_channel(x), Fp8Linear.from_quantized(w8, s, bias)(x),
                               rtol=0, atol=0)
    assert per_channel.weight_scale.shape == (32, 1) and per_channel.bias.dtype == torch.bfloat16
    # a per-tensor scale (scaled-fp8 checkpoints) broadcasts to every channel
    t8 = (w / (w.abs().max() / 448)).to(FP8_DTYPE)
    per_tensor = Fp8Linear.from_quantized(t8, (w.abs().max() / 448).reshape(()))
    assert rel(per_tensor(x), x @ w.t()) < LINEAR_BOUND
    assert not per_tensor.weight.requires_grad and per_tensor.bias is None
    with pytest.raises(ValueError, match='float8_e4m3fn weight'):
        Fp8Linear.from_quantized(w, s)
    with pytest.raises(ValueError, match='weight_scale must have 1 or 32'):
        Fp8Linear.from_quantized(w8, torch.ones(16))
    with pytest.raises(ValueError, match='divisible by 16'):
        Fp8Linear.from_linear(nn.Linear(20, 32))


def test_fp8_linear_refuses_a_cast_weight():
    fp8 = Fp8Linear.from_linear(nn.Linear(32, 32))
    fp8.weight.data = fp8.weight.data.to(torch.bfloat16)  # what a careless dtype pass does
    with pytest.raises(RuntimeError, match='must not be dtype-cast'):
        fp8(torch.randn(2, 32))


# ----------------------------------------------------------------------------- module swap
def _block_linear_names(parts):
    return {f'blocks.{i}.{n}' for i in range(TINY['num_layers']) for n in parts}


def test_parts_vocabulary_and_errors():
    assert set(QUANTIZE_PARTS) == {'ffn', 'attn_proj', 'cross_attn', 'all'}
    assert all(isinstance(v, str) and v for v in QUANTIZE_PARTS.values())
    assert expand_parts(['all']) == ('ffn', 'attn_proj', 'cross_attn')
    assert expand_parts('ffn') == ('ffn',)
    assert expand_parts(['cross_attn', 'ffn']) == ('ffn', 'cross_attn')
    with pytest.raises(ValueError, match=r"unknown fp8 quantize part\(s\) \['mlp'\].*ffn:"):
        swap_linears_(WanModel.from_random(**TINY), ['ffn', 'mlp'])


@pytest.mark.parametrize('parts,count,names', [
    (['ffn'], 4, ('ffn.0', 'ffn.2')),
    (['attn_proj'], 8, ('self_attn.q', 'self_attn.k', 'self_attn.v', 'self_attn.o')),
    (['cross_attn'], 8, ('cross_attn.q', 'cross_attn.k', 'cross_attn.v', 'cross_attn.o')),
    (['all'], 20, None),
])
def test_swap_counts_and_leaves_everything_else(parts, count, names):
    model = WanModel.from_random(seed=1, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert swap_linears_(model, parts) == count
    swapped = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    if names is not None:
        assert swapped == _block_linear_names(names)
    assert len(swapped) == count
    after = model.state_dict()
    for key, value in before.items():
        module = key.rsplit('.', 1)[0]
        if module in swapped:
            continue
        # fp32 islands, norms, modulation, embeddings, head: same tensors, same dtype
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    for name in swapped:
        assert after[f'{name}.weight'].dtype == FP8_DTYPE
        assert after[f'{name}.weight_scale'].dtype == torch.float32
    # idempotent: a second call finds nothing left to replace
    assert swap_linears_(model, parts) == 0
    # the parameter bytes of a swapped linear weight are one per element
    fp8_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                    if isinstance(m, Fp8Linear))
    assert fp8_bytes == sum(m.weight.numel() for m in model.modules()
                            if isinstance(m, Fp8Linear))


def _forward(model):
    gen = torch.Generator().manual_seed(0)
    lat = [torch.randn(16, 3, 8, 8, generator=gen)]
    ctx = [torch.randn(7, TINY['text_dim'], generator=gen)]
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        return model(lat, torch.tensor([700]), ctx, seq_len=48)[0]


def test_no_swap_forward_bit_unchanged_and_swap_close(one_thread):
    ref = _forward(WanModel.from_random(seed=2, **TINY))
    model = WanModel.from_random(seed=2, **TINY)
    assert swap_linears_(model, []) == 0
    assert torch.equal(_forward(model), ref)
    swap_linears_(model, ['all'])
    out = _forward(model)
    err = rel(out, ref)
    # every block linear in fp8 over 2 blocks: a few % on the velocity, not garbage
    assert 1e-3 < err < 0.1, err


# ----------------------------------------------------------------------------- attention
def _qkv(seed=0, b=2, length=96, h=3, d=32, k_offset=4.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, generator=gen) for _ in range(3))
    # keys with a shared per-(head, channel) offset, as projected keys often have
    k = k + k_offset * torch.randn(1, 1, h, d, generator=gen)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def _exact(q, k, v):
    out = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2)


def test_smoothing_alone_changes_only_rounding():
    q, k, v = _qkv()
    sk = smooth_keys(k)
    assert sk.abs().mean() < 0.5 * k.float().abs().mean()  # the offset is really removed
    torch.testing.assert_close(sk.mean(dim=1), torch.zeros_like(sk[:, 0]), atol=1e-5, rtol=0)
    exact = _exact(q, k, v)
    plain = fp8_attention_reference(q, k, v, quantize=False, smooth_k=False)
    smoothed = fp8_attention_reference(q, k, v, quantize=False, smooth_k=True)
    assert rel(plain, exact) < 1e-6
    assert rel(smoothed, exact) < 1e-6


def test_fp8_attention_reference_error_and_smoothing_benefit():
    q, k, v = _qkv()
    exact = _exact(q, k, v)
    smooth = rel(fp8_attention_reference(q, k, v), exact)
    raw = rel(fp8_attention_reference(q, k, v, smooth_k=False), exact)
    probs = rel(fp8_attention_reference(q, k, v, round_probs=True), exact)
    # measured: ~0.05 smoothed, ~0.10 without smoothing, a little more with e4m3 probabilities
    assert 0.01 < smooth < 0.08, smooth
    assert raw > 1.5 * smooth, (raw, smooth)
    assert smooth <= probs < 0.1, probs


def test_quantize_attention_inputs_shapes():
    q, k, v = _qkv(b=2, h=3)
    (q8, qs), (k8, ks), (v8, vs) = quantize_attention_inputs(q, k, v)
    assert q8.dtype == k8.dtype == v8.dtype == FP8_DTYPE and q8.shape == q.shape
    assert qs.shape == ks.shape == vs.shape == (2, 3) and qs.dtype == torch.float32
    torch.testing.assert_close(ks, smooth_keys(k).abs().amax(dim=(1, 3)) / 448)


def test_fp8_attention_gpu_only():
    assert fp8_attention_available('cpu') is False
    with pytest.raises(RuntimeError, match='Hopper'):
        fp8_attention(*_qkv())


@pytest.mark.skipif(not fp8_attention_available(), reason='needs FA3 on a Hopper GPU')
def test_fp8_attention_kernel_matches_emulation():
    q, k, v = (t.cuda() for t in _qkv(length=1000, h=4, d=128))
    out = fp8_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    emulated = fp8_attention_reference(q, k, v, round_probs=True)
    assert rel(out, emulated) < 0.02
    assert rel(out, _exact(q, k, v)) < 0.1


# ----------------------------------------------------------------------------- schedule
def test_schedule():
    steps = 10
    assert [Fp8Schedule().use_fp8(i, steps) for i in range(steps)] == [True] * steps
    s = Fp8Schedule(first_bf16=2, last_bf16=3)
    assert [s.use_fp8(i, steps) for i in range(steps)] == [False] * 2 + [True] * 5 + [False] * 3
    assert not any(Fp8Schedule(first_bf16=6, last_bf16=6).use_fp8(i, steps)
                   for i in range(steps))
    with pytest.raises(ValueError, match='>= 0'):
        Fp8Schedule(first_bf16=-1)
    with pytest.raises(ValueError, match='outside'):
        s.use_fp8(10, steps)
    assert sum(s.use_fp8(i, 40) for i in range(40)) == 35


def test_quantize_pass_in_the_optimized_pipeline(tiny_cfg, tiny_pipe):
    """--quantize ffn: the experts' FFN linears become fp8 (and nothing else), the scales
    stay fp32 through the dtype pass, and the video stays near the bf16 path's."""
    from dataclasses import replace

    from wan.modules.fp8 import Fp8Linear
    from wan.optimizations import OptimizationConfig
    from wan.text2video_optimized import WanT2VOptimized
    kw = dict(size=(128, 64), frame_num=5, shift=12.0, sampling_steps=3, guide_scale=(3.0, 4.0),
              seed=4)
    ref = tiny_pipe.generate('a cat', **kw)
    pipe = WanT2VOptimized(tiny_cfg, None, random_init=True, device='cpu',
                           optimizations=replace(OptimizationConfig.conservative(),
                                                 bf16_weights=True, quantize='ffn'))
    fp8 = [n for n, m in pipe.high_noise_model.named_modules() if isinstance(m, Fp8Linear)]
    assert fp8 == ['blocks.0.ffn.0', 'blocks.0.ffn.2', 'blocks.1.ffn.0', 'blocks.1.ffn.2']
    assert pipe.high_noise_model.blocks[0].ffn[0].weight_scale.dtype == torch.float32
    out = pipe.generate('a cat', **kw)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0 < err < 0.1, err
    with pytest.raises(ValueError, match='unknown fp8 quantize part'):
        OptimizationConfig(quantize='ffn,mlp')


# ----------------------------------------------------------------------------- quantize at load
def _fp8_state(model):
    return {n: t for n, t in model.state_dict().items()}


def _assert_same_state(a, b):
    sa, sb = _fp8_state(a), _fp8_state(b)
    assert sa.keys() == sb.keys()
    for n in sa:
        assert sa[n].dtype == sb[n].dtype, n
        assert torch.equal(sa[n].view(torch.uint8) if sa[n].dtype == FP8_DTYPE else sa[n],
                           sb[n].view(torch.uint8) if sb[n].dtype == FP8_DTYPE else sb[n]), n


def _load_hooks(parts, rule, runner_box=None):
    """before_load + transform as WanT2VOptimized.load_expert composes them: swap on meta,
    cast to the stored dtypes, (a streaming runner of the fp8 layout), quantize as loaded."""
    from wan.modules.fp8 import fp8_weight_names, quantize_transform
    from wan.utils.block_streaming import StreamingBlockRunner
    names = []

    def before_load(model):
        swap_linears_(model, parts)
        names.extend(fp8_weight_names(model))
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.data = t.data.to(rule(name, t))
        if runner_box is not None:
            runner_box['runner'] = StreamingBlockRunner(model.blocks, 'cpu')
    return before_load, quantize_transform(names, 'cpu', rule)


@pytest.mark.parametrize('mode', ['matmul', 'all'])
def test_quantize_while_loading_equals_swapping_after(tmp_path, one_thread, mode):
    """Random weights and a real-format checkpoint: fp8 linears quantized as the tensors
    stream in hold exactly the bytes of the same model loaded in bf16 and swapped after, and
    the scales stay fp32 under every dtype policy ('all' is --convert_model_dtype's)."""
    from wan.utils.dtype_policy import dtype_rule
    rule = dtype_rule(WanModel, mode, torch.bfloat16)
    after = WanModel.from_random(seed=3, dtype_rule=rule, **TINY)
    swap_linears_(after, ['all'])
    before_load, transform = _load_hooks(['all'], rule)
    loading = WanModel.from_random(seed=3, dtype_rule=rule, before_load=before_load,
                                   transform=transform, **TINY)
    _assert_same_state(loading, after)
    assert loading.blocks[0].ffn[0].weight_scale.dtype == torch.float32
    assert loading.blocks[0].ffn[0].bias.dtype == torch.bfloat16
    if mode == 'matmul':  # (a model stored all-bf16 runs inside the pipeline, tested there)
        assert torch.equal(_forward(loading), _forward(after))

    WanModel.from_random(seed=3, **TINY).save_pretrained(str(tmp_path))
    after = WanModel.from_pretrained(str(tmp_path), dtype_rule=rule)
    swap_linears_(after, ['all'])
    before_load, transform = _load_hooks(['all'], rule)
    loading = WanModel.from_pretrained(str(tmp_path), dtype_rule=rule,
                                       before_load=before_load, transform=transform)
    _assert_same_state(loading, after)


def test_fp8_expert_streams_bit_for_bit(tmp_path, one_thread):
    """An fp8 expert loaded straight into the streaming host buffer (half the bytes of a
    bf16 block) computes exactly what the resident fp8 expert computes."""
    from wan.utils.block_streaming import BlockLayout, make_place
    from wan.utils.dtype_policy import dtype_rule
    rule = dtype_rule(WanModel, 'matmul', torch.bfloat16)
    WanModel.from_random(seed=4, **TINY).save_pretrained(str(tmp_path))
    resident = WanModel.from_pretrained(str(tmp_path), dtype_rule=rule)
    bf16_block = BlockLayout(resident.blocks[0]).nbytes
    swap_linears_(resident, ['all'])
    box = {}
    before_load, transform = _load_hooks(['all'], rule, box)
    streamed = WanModel.from_pretrained(
        str(tmp_path), dtype_rule=rule, before_load=before_load, transform=transform,
        place=lambda name, t: make_place(box['runner'], 'cpu')(name, t))
    runner = box['runner']
    streamed.block_runner = runner
    assert runner.bytes_per_block < 0.7 * bf16_block
    host = runner.host
    for p in streamed.blocks.parameters():
        assert host.data_ptr() <= p.data_ptr() < host.data_ptr() + host.numel()
    assert torch.equal(_forward(streamed), _forward(resident))


def test_optimized_pipeline_quantizes_while_loading(tiny_cfg, one_thread):
    """WanT2VOptimized(--quantize all) builds fp8 experts whose bytes equal quantizing its
    bf16 experts after loading; the planner sees fp8 sizes; --convert_model_dtype composes."""
    from dataclasses import replace

    from wan.modules.fp8 import linears_to_swap
    from wan.optimizations import OptimizationConfig
    from wan.text2video_optimized import WanT2VOptimized
    base = replace(OptimizationConfig.conservative(), bf16_weights=True)
    plain = WanT2VOptimized(tiny_cfg, None, random_init=True, device='cpu', optimizations=base)
    fp8 = WanT2VOptimized(tiny_cfg, None, random_init=True, device='cpu',
                          optimizations=replace(base, quantize='all'))
    for a, b in zip(plain.experts(), fp8.experts()):
        assert linears_to_swap(a, ['all']) > 0 and linears_to_swap(b, ['all']) == 0
        swap_linears_(a, ['all'])
        _assert_same_state(b, a)

    def nbytes(model):
        return sum(t.numel() * t.element_size() for t in [*model.parameters(),
                                                            *model.buffers()])
    assert nbytes(fp8._meta_expert()) == nbytes(fp8.high_noise_model)
    assert nbytes(fp8._meta_expert().blocks) < 0.75 * nbytes(plain._meta_expert().blocks)
    conv = WanT2VOptimized(tiny_cfg, None, random_init=True, device='cpu',
                           convert_model_dtype=True, optimizations=replace(base, quantize='ffn'))
    assert conv.high_noise_model.blocks[0].ffn[0].weight_scale.dtype == torch.float32
    video = conv.generate('a cat', size=(128, 64), frame_num=5, shift=12.0, sampling_steps=2,
                          guide_scale=(3.0, 4.0), seed=4)
    assert torch.isfinite(video).all()
    with pytest.raises(ValueError, match='--dit_fsdp'):
        WanT2VOptimized(tiny_cfg, None, random_init=True, device='cpu', dit_fsdp=True,
                        optimizations=replace(base, quantize='ffn'))


# ----------------------------------------------------------------------------- bf16 steps
def test_fp8_linear_bf16_compute_is_the_dequantized_linear():
    """compute_fp8 off: the input unquantized, the weight dequantized to bf16 -- exactly an
    nn.Linear holding the dequantized weight."""
    from wan.modules.fp8 import set_fp8_compute_
    gen = torch.Generator().manual_seed(5)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(3, 7, 64, generator=gen)
    model = nn.Sequential(Fp8Linear.from_linear(linear))
    fp8_out = model(x)
    assert set_fp8_compute_(model, False) == 1
    plain = nn.Linear(64, 48).to(torch.bfloat16)
    plain.weight.data = dequantize(model[0].weight, model[0].weight_scale).to(torch.bfloat16)
    plain.bias.data = linear.bias.data
    with torch.no_grad():
        assert torch.equal(model(x), plain(x.bfloat16()))
        assert not torch.equal(model(x), fp8_out)
    set_fp8_compute_(model, True)
    assert torch.equal(model(x), fp8_out)


def test_fp8_schedule_in_the_pipeline(tiny_cfg, one_thread):
    """--fp8_first_bf16_steps / --fp8_last_bf16_steps: every step in bf16 is the bf16
    pipeline on the dequantized fp8 weights, bit for bit; a mixed schedule is neither that
    nor the all-fp8 run; the toggles need fp8 and non-negative counts."""
    from dataclasses import replace

    from wan.optimizations import OptimizationConfig
    from wan.text2video_optimized import WanT2VOptimized
    base = replace(OptimizationConfig.conservative(), bf16_weights=True)
    kw = dict(size=(128, 64), frame_num=5, shift=12.0, sampling_steps=3,
              guide_scale=(3.0, 4.0), seed=4)

    def video(**toggles):
        pipe = WanT2VOptimized(tiny_cfg, None, random_init=True, device='cpu',
                               optimizations=replace(base, **toggles))
        return pipe, pipe.generate('a cat', **kw)
    _, all_fp8 = video(quantize='ffn')
    _, all_bf16 = video(quantize='ffn', fp8_first_bf16_steps=3)
    _, mixed = video(quantize='ffn', fp8_first_bf16_steps=1, fp8_last_bf16_steps=1)
    dequantized, _ = video()
    for model in dequantized.experts():
        for block in model.blocks:
            for linear in (block.ffn[0], block.ffn[2]):
                q, scale = quantize_rowwise(linear.weight.data)
                linear.weight.data = dequantize(q, scale).to(torch.bfloat16)
    assert torch.equal(all_bf16, dequantized.generate('a cat', **kw))
    assert not torch.equal(mixed, all_fp8) and not torch.equal(mixed, all_bf16)
    with pytest.raises(ValueError, match='need --quantize or --attention fa3_fp8'):
        OptimizationConfig(fp8_first_bf16_steps=2)
    with pytest.raises(ValueError, match='must be >= 0'):
        OptimizationConfig(quantize='ffn', fp8_last_bf16_steps=-1)
