"""WanT2VOptimized: every toggle reproduces the reference pipeline (tiny config in fp32, CPU),
optimize_pipeline, the prompt cache, batched CFG, and the memory planner's decisions."""
from __future__ import annotations

import copy
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from easydict import EasyDict

from wan.text2video import WanT2V
from wan.text2video_optimized import OptimizationConfig, WanT2VOptimized, optimize_pipeline
from wan.utils.memory_plan import GiB, ModelSizes, cpu_plan, plan_memory

SIZE = (128, 64)
FRAMES = 9
STEPS = 6  # timesteps 999, 983, 959, 922 (high noise) | 856, 705 (low noise) at shift 12
SEED = 11
PROMPT = 'a lighthouse in a storm'
REL_TOL = 1e-4


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope='module')
def cfg32(tiny_cfg):
    cfg = EasyDict(copy.deepcopy(dict(tiny_cfg)))
    cfg.param_dtype = torch.float32  # autocast off, attention in fp32
    return cfg


def build(cfg):
    return WanT2V(cfg, None, random_init=True, random_init_seed=0, device='cpu')


class Run:
    """generate() with the model calls, time-embedding inputs and final latents recorded."""

    def __init__(self, pipe, **kw):
        self.calls, self.time_shapes, self.x0 = [], [], None
        hooks = []
        for name in ('high_noise_model', 'low_noise_model'):
            model = getattr(pipe, name)
            hooks.append(model.register_forward_pre_hook(
                lambda m, args, kwargs, _n=name: self.calls.append(
                    (_n, len(args[0] if args else kwargs['x']))), with_kwargs=True))
            hooks.append(model.time_embedding.register_forward_pre_hook(
                lambda m, args: self.time_shapes.append(tuple(args[0].shape))))
        orig_decode = type(pipe).decode

        def decode(x0):
            self.x0 = x0.clone()
            return orig_decode(pipe, x0)

        pipe.decode = decode
        try:
            args = dict(size=SIZE, frame_num=FRAMES, shift=12.0, sampling_steps=STEPS,
                        guide_scale=(3.0, 4.0), seed=SEED, offload_model=True)
            args.update(kw)
            self.video = pipe.generate(PROMPT, **args)
        finally:
            del pipe.decode
            for h in hooks:
                h.remove()


@pytest.fixture(scope='module')
def reference(cfg32):
    pipe = build(cfg32)
    run = Run(pipe)
    experts = [c[0] for c in run.calls]
    # at least one step of each expert, cond and uncond as two batch-1 passes
    assert experts == ['high_noise_model'] * 8 + ['low_noise_model'] * 4
    assert all(n == 1 for _, n in run.calls)
    return run


@pytest.fixture(scope='module')
def opt_pipe(cfg32):
    plain = build(cfg32)
    weights = {k: v.clone() for k, v in plain.high_noise_model.state_dict().items()}
    pipe = optimize_pipeline(plain, compile=False)
    assert pipe is plain and type(pipe) is WanT2VOptimized
    sd = pipe.high_noise_model.state_dict()
    assert all(torch.equal(weights[k], sd[k]) for k in weights)
    return pipe


ALL_ON = dict(batched_cfg=True, per_sample_time=True, fast_rope=True, attention='auto',
              bf16_weights=True, compile=True, resident=True, prompt_cache=True,
              vae_cudnn_benchmark=True, vae_channels_last=True, tf32=True)
ALONE = [dict(batched_cfg=True), dict(per_sample_time=True), dict(fast_rope=True),
         dict(attention='auto'), dict(attention='sdpa'), dict(bf16_weights=True),
         dict(tf32=True), dict(compile=True), dict(prompt_cache=True), dict(resident=True),
         dict(vae_cudnn_benchmark=True), dict(vae_channels_last=True)]


CASES = [({}, True)] + [(t, True) for t in ALONE] + [(ALL_ON, True), ({}, False),
                                                      (ALL_ON, False)]


@pytest.mark.parametrize('toggles,offload_model', CASES, ids=[
    ('+'.join(f'{k}={v}' for k, v in t.items()) or 'conservative')
    + ('' if off else '-no_offload') for t, off in CASES])
def test_toggle_matches_reference(opt_pipe, reference, toggles, offload_model):
    opts = OptimizationConfig.conservative()
    for k, v in toggles.items():
        setattr(opts, k, v)
    opt_pipe._setup_optimizations(opts)
    run = Run(opt_pipe, offload_model=offload_model)

    assert rel_err(run.x0, reference.x0) < REL_TOL
    assert run.video.shape == reference.video.shape == (3, 9, 64, 128)
    assert rel_err(run.video, reference.video) < REL_TOL
    if not toggles:
        # every toggle off is the reference computation itself
        assert torch.equal(run.x0, reference.x0)

    # each toggle did take effect where it is observable
    batched = opts.batched_cfg
    assert [n for _, n in run.calls] == ([2] * STEPS if batched else [1] * (2 * STEPS))
    token_axis = {s[1] for s in run.time_shapes}
    assert token_axis == ({1} if opts.per_sample_time else {96})
    rope_cached = bool(opt_pipe.high_noise_model._rope_cache)
    assert rope_cached == opts.fast_rope
    assert opt_pipe.attention_backend == 'sdpa'
    assert all(p.dtype == torch.float32 for p in opt_pipe.high_noise_model.parameters())
    assert all(b._compiled_call_impl is None for b in opt_pipe.high_noise_model.blocks)
    assert bool(opt_pipe._prompt_cache) == opts.prompt_cache
    assert opt_pipe.vae.channels_last is False  # CUDA only: no benefit on CPU


def test_every_field_is_a_toggle():
    """The lists above cover every OptimizationConfig field, and conservative() turns each
    off (compile_mode is compile's setting, not a toggle of its own)."""
    names = {f.name for f in fields(OptimizationConfig)} - {'compile_mode'}
    assert set(ALL_ON) == names
    assert {k for t in ALONE for k in t} == names
    default, off = OptimizationConfig(), OptimizationConfig.conservative()
    assert default.vae_channels_last is True  # same math: on by default
    for name in names - {'attention'}:
        assert getattr(off, name) is False, name
    assert off.attention == 'reference'


def test_vae_channels_last_applied_on_cuda_only(monkeypatch):
    """_setup_optimizations sets the VAE layout from the toggle on a (simulated) CUDA device,
    both ways, and leaves it off on CPU."""
    import wan.text2video_optimized as opt
    from wan.modules.vae2_1 import Wan2_1_VAE
    monkeypatch.setattr(opt, 'resolve_backend', lambda name, device: 'sdpa')
    pipe = WanT2VOptimized.__new__(WanT2VOptimized)
    expert = SimpleNamespace(set_options=lambda options: None, blocks=[])
    pipe.low_noise_model = pipe.high_noise_model = expert
    pipe.param_dtype = torch.float32
    pipe._t5_offload = None  # no pinned T5 copy in this stub
    pipe.vae = Wan2_1_VAE(device='cpu', dim=8, random_init_seed=0)
    on = OptimizationConfig(compile=False)
    # process-wide switches that _setup_optimizations sets on CUDA: restored below
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    try:
        for device, toggle, expected in [('cuda', True, True), ('cuda', False, False),
                                         ('cuda', True, True), ('cpu', True, False)]:
            pipe.device = torch.device(device)
            on.vae_channels_last = toggle
            pipe._setup_optimizations(on)
            assert pipe.vae.channels_last is expected, (device, toggle)
            conv = pipe.vae.model.decoder.head[2].weight
            assert conv.is_contiguous(memory_format=torch.channels_last_3d) is expected
            assert conv.is_contiguous() is not expected
        pipe.device = torch.device('cuda')
        pipe._setup_optimizations(OptimizationConfig.conservative())
        assert pipe.vae.channels_last is False
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved


def test_conservative_class_constructor_equals_reference(cfg32, reference):
    pipe = WanT2VOptimized(cfg32, None, random_init=True, device='cpu',
                           optimizations=OptimizationConfig.conservative())
    run = Run(pipe)
    assert torch.equal(run.x0, reference.x0)
    assert torch.equal(run.video, reference.video)


def test_bf16_config(tiny_cfg, tiny_pipe):
    """On the bf16 config: storing the autocast-only matmul weights in bf16 is bit-exact (the
    reference casts them on every call); the fp32 islands keep fp32 weights. With every
    toggle on, the result stays close (bf16 rounding of tiny differences only)."""
    ref = Run(tiny_pipe)
    pipe = build(tiny_cfg)
    opts = OptimizationConfig.conservative()
    opts.bf16_weights = True
    optimize_pipeline(pipe, **opts.as_dict())
    dtypes = {n: p.dtype for n, p in pipe.high_noise_model.named_parameters()}
    for name, dtype in dtypes.items():
        island = name.startswith(('time_embedding', 'time_projection', 'head')) or \
            'norm' in name or 'modulation' in name
        assert dtype == (torch.float32 if island else torch.bfloat16), name
    assert dtypes['blocks.0.self_attn.q.weight'] == torch.bfloat16
    assert dtypes['blocks.1.ffn.2.bias'] == torch.bfloat16
    assert dtypes['patch_embedding.weight'] == torch.bfloat16
    run = Run(pipe)
    assert torch.equal(run.x0, ref.x0)
    assert torch.equal(run.video, ref.video)

    pipe._setup_optimizations(OptimizationConfig(**ALL_ON))
    run = Run(pipe)
    assert [n for _, n in run.calls] == [2] * STEPS
    assert rel_err(run.x0, ref.x0) < 2e-2


@pytest.mark.parametrize('dtype', ['bf16', 'fp32'])
def test_warm_up_runs_both_experts(opt_pipe, tiny_cfg, dtype):
    pipe = opt_pipe if dtype == 'fp32' else optimize_pipeline(build(tiny_cfg), compile=False)
    pipe._setup_optimizations(OptimizationConfig(compile=False, batched_cfg=True))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a, k, _n=n: seen.append((_n, len(a[0] if a else k['x']))),
                                         with_kwargs=True)
             for n, m in (('high', pipe.high_noise_model), ('low', pipe.low_noise_model))]
    try:
        seconds = pipe.warm_up(SIZE, FRAMES)
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(seconds, float) and seconds >= 0
    assert seen == [('high', 2), ('low', 2)]


def _inputs(pipe):
    with torch.no_grad():
        # fp32 compute: the pipeline casts the bf16 T5 output (no autocast to do it)
        ctx = pipe.text_encoder([PROMPT], torch.device('cpu'))[0].float()
        ctx_null = pipe.text_encoder([pipe.sample_neg_prompt], torch.device('cpu'))[0].float()
    latents = torch.randn(16, 3, 8, 16, generator=torch.Generator().manual_seed(3))
    return latents, ctx, ctx_null


def _plan(batched):
    return cpu_plan(ModelSizes.a14b(), want_batched_cfg=batched)


@pytest.mark.parametrize('per_sample_time', [False, True])
def test_batched_cfg_equals_two_passes(opt_pipe, per_sample_time):
    opts = OptimizationConfig.conservative()
    opts.per_sample_time = per_sample_time
    opt_pipe._setup_optimizations(opts)
    latents, ctx, ctx_null = _inputs(opt_pipe)
    model = opt_pipe.high_noise_model
    seen = []
    h = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((len(kwargs.get('x', args[0] if args else None)),
                                             tuple(kwargs['t'].shape))), with_kwargs=True)
    out = {}
    try:
        for batched in (False, True):
            opt_pipe._plan = _plan(batched)
            with torch.no_grad():
                out[batched] = opt_pipe._predict_noise(model, latents, torch.tensor(950), ctx,
                                                       ctx_null, 96, 4.0)
    finally:
        opt_pipe._plan = None
        h.remove()
    assert seen == [(1, (1,)), (1, (1,)), (2, (2,))]
    assert out[True].shape == (16, 3, 8, 16)
    assert rel_err(out[True], out[False]) < 1e-5
    # and it is the guided combination, not one branch
    with torch.no_grad():
        c = model([latents], t=torch.tensor([950]), context=[ctx], seq_len=96)[0]
        u = model([latents], t=torch.tensor([950]), context=[ctx_null], seq_len=96)[0]
    assert rel_err(out[True], u + 4.0 * (c - u)) < 1e-5
    assert rel_err(out[True], c) > 1e-3


def test_per_sample_time_equals_per_token(opt_pipe):
    latents, ctx, _ = _inputs(opt_pipe)
    model = opt_pipe.low_noise_model
    out = {}
    for per_sample in (False, True):
        opts = OptimizationConfig.conservative()
        opts.per_sample_time = per_sample
        opt_pipe._setup_optimizations(opts)
        shapes = []
        h = model.time_embedding.register_forward_pre_hook(
            lambda m, args: shapes.append(tuple(args[0].shape)))
        with torch.no_grad():
            out[per_sample] = model([latents], t=torch.tensor([700]), context=[ctx],
                                    seq_len=96)[0]
        h.remove()
        assert shapes == [(1, 1 if per_sample else 96, 256)]
    assert rel_err(out[True], out[False]) < 1e-6


def test_prompt_cache_encodes_once(opt_pipe):
    calls = []
    h = opt_pipe.text_encoder.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        opts = OptimizationConfig.conservative()
        opts.prompt_cache = True
        opt_pipe._setup_optimizations(opts)
        a, b = opt_pipe._encode_text(['same prompt', 'same prompt'], False)
        assert len(calls) == 1 and torch.equal(a, b)
        (c,) = opt_pipe._encode_text(['same prompt'], False)
        assert len(calls) == 1 and torch.equal(a, c)
        opt_pipe._encode_text(['another prompt'], False)
        assert len(calls) == 2
        # two generate() calls with one prompt: prompt and negative prompt encoded once each
        calls.clear()
        opt_pipe._setup_optimizations(opts)
        for _ in range(2):
            Run(opt_pipe, sampling_steps=1, frame_num=1)
        assert len(calls) == 2

        opts.prompt_cache = False
        opt_pipe._setup_optimizations(opts)
        calls.clear()
        opt_pipe._encode_text(['same prompt', 'same prompt'], False)
        assert len(calls) == 2
    finally:
        h.remove()


def test_optimize_pipeline_api(cfg32):
    pipe = build(cfg32)
    with pytest.raises(TypeError, match='no_such_toggle'):
        optimize_pipeline(pipe, no_such_toggle=True)
    assert type(pipe) is WanT2V  # unchanged after the rejection
    params = list(pipe.low_noise_model.parameters())
    out = optimize_pipeline(pipe, compile=False, batched_cfg=False)
    assert out is pipe and isinstance(pipe, WanT2VOptimized) and isinstance(pipe, WanT2V)
    assert pipe.opt.batched_cfg is False and pipe.opt.per_sample_time is True
    assert all(a is b for a, b in zip(params, pipe.low_noise_model.parameters()))
    with pytest.raises(ValueError):
        optimize_pipeline(pipe)
    with pytest.raises(ValueError):
        OptimizationConfig(compile_mode='fastest')


def test_plan_for_uses_free_memory_and_raises_when_nothing_fits(cfg32, monkeypatch):
    """plan_for on a (simulated) GPU: free memory + our own resident weights is the budget."""
    import wan.text2video_optimized as opt
    pipe = WanT2VOptimized.__new__(WanT2VOptimized)
    a14b = EasyDict(copy.deepcopy(dict(cfg32)))
    a14b.update(dim=5120, ffn_dim=13824, num_layers=40)
    pipe.config, pipe.t5_cpu = a14b, False
    pipe.device = torch.device('cuda:0')
    pipe.opt = OptimizationConfig()

    class Fake(torch.nn.Module):
        def __init__(self, nbytes):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(nbytes // 2, dtype=torch.bfloat16,
                                                    device='meta'))

    expert = int(26.6 * GiB)
    pipe.low_noise_model, pipe.high_noise_model = Fake(expert), Fake(expert)
    pipe.text_encoder = SimpleNamespace(model=Fake(int(10.6 * GiB)))
    free, cached = {}, {'reserved': 0, 'allocated': 0}
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (free['v'], 80 * GiB))
    monkeypatch.setattr(torch.cuda, 'memory_reserved', lambda device=None: cached['reserved'])
    monkeypatch.setattr(torch.cuda, 'memory_allocated',
                        lambda device=None: cached['allocated'])

    free['v'] = 79.1 * GiB
    plan = pipe.plan_for((1280, 720), 81)
    assert plan.fits and plan.experts_resident and not plan.batched_cfg
    assert not pipe.plan_for((832, 480), 81).batched_cfg  # off by default (opt-in)
    assert pipe.plan_for((832, 480), 81, batched_cfg=True).batched_cfg
    # offload_model=True (the reference's offloading) never keeps both experts resident
    assert not pipe.plan_for((832, 480), 81, offload_model=True).experts_resident
    assert not pipe.plan_for((832, 480), 81, batched_cfg=False).batched_cfg
    # blocks the caching allocator reserved but does not use count as free
    free['v'] = 66 * GiB  # both experts + batch-1 activations need ~67.7 GiB
    assert not pipe.plan_for((1280, 720), 81).experts_resident
    cached.update(reserved=int(12 * GiB), allocated=int(2.9 * GiB))
    assert pipe.plan_for((1280, 720), 81).experts_resident
    cached.update(reserved=0, allocated=0)
    free['v'] = 10 * GiB
    with pytest.raises(torch.cuda.OutOfMemoryError, match='does not fit'):
        pipe.plan_for((1280, 720), 81)
    assert opt.plan_memory is plan_memory


def test_decode_beside_experts_follows_the_measured_probe(monkeypatch):
    """decode() keeps the experts on the GPU when the probe's measured peak plus the output
    video fits in the memory free now, and moves them out otherwise (or with no probe)."""
    pipe = WanT2VOptimized.__new__(WanT2VOptimized)
    pipe.vae_stride = (4, 8, 8)
    pipe.device = torch.device('cuda')
    x0 = torch.zeros(16, 21, 90, 160)  # 1280x720, 81 frames
    video = 3 * 81 * 720 * 1280 * 4
    GiB = 2**30
    free = {'now': 30 * GiB}
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (free['now'], 80 * GiB))
    monkeypatch.setattr(torch.cuda, 'memory_reserved', lambda device=None: 5 * GiB)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: 5 * GiB)
    pipe._vae_probe = {}
    assert not pipe._decode_fits_beside_experts(x0)  # never probed at this size
    pipe._vae_probe = {(90, 160): None}
    assert not pipe._decode_fits_beside_experts(x0)  # the probe itself ran out of memory
    pipe._vae_probe = {(90, 160): 20 * GiB}
    assert pipe._decode_fits_beside_experts(x0)
    free['now'] = 20 * GiB + 3 * video + GiB - 1
    assert not pipe._decode_fits_beside_experts(x0)
    free['now'] += 1
    assert pipe._decode_fits_beside_experts(x0)


def test_vae_probe_is_gpu_only(opt_pipe):
    opt_pipe._vae_probe = {}
    opt_pipe._probe_vae((128, 64))
    assert opt_pipe._vae_probe == {}  # CPU: nothing to autotune, no GPU memory to measure
