"""WanT2VOptimized: every toggle reproduces the reference pipeline (tiny config, CPU; the
CUDA-only toggles on a GPU), the ordered one-shot passes, optimize_pipeline, the prompt cache,
batched CFG, and the memory planner's decisions."""
from __future__ import annotations

import copy
from dataclasses import FrozenInstanceError, replace

import pytest
import torch
from easydict import EasyDict

from wan.optimizations import PASSES, apply_passes, backend_flags, toggle_names
from wan.text2video import WanT2V
from wan.text2video_optimized import OptimizationConfig, WanT2VOptimized, optimize_pipeline
from wan.utils.memory_plan import GiB, ModelSizes, cpu_plan

SIZE = (128, 64)
FRAMES = 9
STEPS = 6  # timesteps 999, 983, 959, 922 (high noise) | 856, 705 (low noise) at shift 12
SEED = 11
PROMPT = 'a lighthouse in a storm'
REL_TOL = 1e-4
CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not CUDA, reason='CUDA-only toggle: no effect on the CPU')


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope='module')
def cfg32(tiny_cfg):
    cfg = EasyDict(copy.deepcopy(dict(tiny_cfg)))
    cfg.param_dtype = torch.float32  # autocast off, attention in fp32
    return cfg


def build(cfg):
    return WanT2V(cfg, None, random_init=True, random_init_seed=0, device='cpu')


def build_optimized(cfg, **toggles):
    """A fresh optimized pipeline (same random weights as build(cfg)), conservative except
    for `toggles`."""
    opts = replace(OptimizationConfig.conservative(), **toggles)
    return WanT2VOptimized(cfg, None, random_init=True, random_init_seed=0, device='cpu',
                           optimizations=opts)


class Run:
    """generate() with the model calls, time-embedding inputs and final latents recorded."""

    def __init__(self, pipe, **kw):
        from wan.utils.timing import PipelineObserver
        self.calls, self.time_shapes, self.x0 = [], [], None
        hooks = []
        for name in ('high_noise_model', 'low_noise_model'):
            model = getattr(pipe, name)
            hooks.append(model.register_forward_pre_hook(
                lambda m, args, kwargs, _n=name: self.calls.append(
                    (_n, len(args[0] if args else kwargs['x']))), with_kwargs=True))
            hooks.append(model.time_embedding.register_forward_pre_hook(
                lambda m, args: self.time_shapes.append(tuple(args[0].shape))))
        run = self

        class Latent(PipelineObserver):
            def stage_started(self, name, info):
                if name == 'decode':
                    run.x0 = info['latent'].clone()

        observer = pipe.add_observer(Latent())
        try:
            args = dict(size=SIZE, frame_num=FRAMES, shift=12.0, sampling_steps=STEPS,
                        guide_scale=(3.0, 4.0), seed=SEED, offload_model=True)
            args.update(kw)
            self.video = pipe.generate(PROMPT, **args)
        finally:
            pipe.remove_observer(observer)
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
    assert type(pipe) is WanT2VOptimized and pipe.high_noise_model is plain.high_noise_model
    sd = pipe.high_noise_model.state_dict()
    assert all(torch.equal(weights[k], sd[k]) for k in weights)
    return pipe


# toggles that change the computation on the CPU, with how to see that they took effect
CPU_TOGGLES = [dict(batched_cfg=True), dict(per_sample_time=True), dict(fast_rope=True),
               dict(prompt_cache=True), dict(ffn_chunk_tokens=40)]
# toggles whose effect exists only on a GPU (kernels, compile, cuDNN, TF32, VAE layout)
GPU_TOGGLES = [dict(attention='auto'), dict(compile=True), dict(tf32=True),
               dict(vae_cudnn_benchmark=True), dict(vae_channels_last=True)]
ALL_CPU = {k: v for t in CPU_TOGGLES for k, v in t.items()}
CASES = [({}, True)] + [(t, True) for t in CPU_TOGGLES] + [(ALL_CPU, True), ({}, False),
                                                           (ALL_CPU, False)]


def _check_effects(pipe, run, opts):
    """Each toggle did take effect where it is observable."""
    assert [n for _, n in run.calls] == ([2] * STEPS if opts.batched_cfg else
                                         [1] * (2 * STEPS))
    assert {s[1] for s in run.time_shapes} == ({1} if opts.per_sample_time else {96})
    tables = {t.is_complex() for t in pipe.high_noise_model._rope_cache.values()}
    assert tables == ({False} if opts.fast_rope else {True})  # fp32 (cos, sin) vs complex128
    assert bool(pipe._prompt_cache) == opts.prompt_cache
    assert pipe.high_noise_model.blocks[0].options.ffn_chunk_tokens == opts.ffn_chunk_tokens


@pytest.mark.parametrize('toggles,offload_model', CASES, ids=[
    ('+'.join(f'{k}={v}' for k, v in t.items()) or 'conservative')
    + ('' if off else '-no_offload') for t, off in CASES])
def test_toggle_matches_reference(cfg32, reference, toggles, offload_model):
    pipe = build_optimized(cfg32, **toggles)
    run = Run(pipe, offload_model=offload_model)
    assert rel_err(run.x0, reference.x0) < REL_TOL
    assert run.video.shape == reference.video.shape == (3, 9, 64, 128)
    assert rel_err(run.video, reference.video) < REL_TOL
    if not toggles:
        # every toggle off is the reference computation itself
        assert torch.equal(run.x0, reference.x0)
    _check_effects(pipe, run, pipe.opt)
    assert pipe.attention_backend == 'sdpa' and pipe.compiled is False
    assert all(p.dtype == torch.float32 for p in pipe.high_noise_model.parameters())


@gpu_only
@pytest.mark.parametrize('toggles', GPU_TOGGLES, ids=lambda t: next(iter(t)))
def test_gpu_toggle_matches_reference(tiny_cfg, toggles):
    """On a GPU (bf16, autocast): each CUDA-only toggle keeps the reference's video within the
    kernel-swap rounding level and takes effect."""
    ref_pipe = WanT2V(tiny_cfg, None, random_init=True, random_init_seed=0)
    ref = Run(ref_pipe)
    pipe = WanT2VOptimized(tiny_cfg, None, random_init=True, random_init_seed=0,
                           optimizations=replace(OptimizationConfig.conservative(), **toggles))
    run = Run(pipe)
    assert rel_err(run.x0, ref.x0) < 3e-2
    if 'compile' in toggles:
        assert pipe.compiled
    if 'vae_channels_last' in toggles:
        assert pipe.vae.channels_last


def test_every_field_is_a_toggle():
    """The lists above cover every on/off toggle, conservative() turns each off, the config
    is frozen (one configuration per pipeline) and validated."""
    names = set(toggle_names())
    # bf16_weights: test_bf16_config (it needs the bf16 config); cfg_skip: test_cfg_skip (it
    # needs a guide scale of 1)
    assert names == {k for t in CPU_TOGGLES + GPU_TOGGLES for k in t} - {
        'attention', 'ffn_chunk_tokens'} | {'bf16_weights', 'cfg_skip'}
    default, off = OptimizationConfig(), OptimizationConfig.conservative()
    assert default.vae_channels_last is True  # same math: on by default
    assert all(getattr(off, name) is False for name in names)
    assert off.attention == 'reference' and off.ffn_chunk_tokens == 0
    with pytest.raises(FrozenInstanceError):
        default.compile = False
    with pytest.raises(ValueError, match='attention must be one of'):
        OptimizationConfig(attention='fastest')


def test_passes_run_once_in_order(cfg32):
    assert [name for name, _ in PASSES] == ['module swaps', 'weight dtype',
                                            'attention kernels', 'compile']
    pipe = build_optimized(cfg32)
    with pytest.raises(ValueError, match='already optimized'):
        apply_passes(pipe, pipe.opt)
    with pytest.raises(ValueError, match='already optimized'):
        optimize_pipeline(pipe)


def test_vae_channels_last_only_on_cuda(cfg32, monkeypatch):
    """The VAE layout follows the toggle on a (simulated) CUDA device and stays default on
    the CPU, where channels-last convolutions are slower."""
    import wan.text2video_optimized as opt
    monkeypatch.setattr(opt, 'PinnedOffload', lambda module: None)
    monkeypatch.setattr(opt, 'apply_passes',
                        lambda p, c: p.__dict__.update(compiled=False, attention_backend='sdpa'))
    for device, toggle, expected in [('cuda', True, True), ('cuda', False, False),
                                     ('cpu', True, False)]:
        plain = build(cfg32)
        plain.device = torch.device(device)
        pipe = WanT2VOptimized.from_pipeline(
            plain, replace(OptimizationConfig(), vae_channels_last=toggle))
        assert pipe.vae.channels_last is expected, (device, toggle)
        conv = pipe.vae.model.decoder.head[2].weight
        assert conv.is_contiguous(memory_format=torch.channels_last_3d) is expected


def test_process_wide_switches_are_scoped_to_a_call():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = False, False
        cfg = OptimizationConfig(tf32=True, vae_cudnn_benchmark=True)
        with backend_flags(cfg, torch.device('cuda')):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        with backend_flags(cfg, torch.device('cpu')):  # nothing to switch on the CPU
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize('solver', ['unipc', 'euler'])
def test_cfg_skip_equals_two_passes(cfg32, solver):
    """Guide scale 1.0: one conditional pass per step instead of two, the same latents to
    fp32 rounding (upstream computes uncond + 1.0 * (cond - uncond))."""
    kw = dict(guide_scale=(1.0, 1.0), sample_solver=solver, sampling_steps=4, shift=5.0)
    two = Run(build_optimized(cfg32), **kw)
    one = Run(build_optimized(cfg32, cfg_skip=True), **kw)
    assert [n for _, n in two.calls] == [1] * 8 and [n for _, n in one.calls] == [1] * 4
    assert rel_err(one.x0, two.x0) < 1e-6
    # a scale other than 1 keeps both passes
    mixed = Run(build_optimized(cfg32, cfg_skip=True), **dict(kw, guide_scale=(1.0, 3.5)))
    experts = [e for e, _ in mixed.calls]
    assert experts.count('high_noise_model') == 2 * experts.count('low_noise_model')


def test_conservative_class_constructor_equals_reference(cfg32, reference):
    pipe = build_optimized(cfg32)
    run = Run(pipe)
    assert torch.equal(run.x0, reference.x0)
    assert torch.equal(run.video, reference.video)


def test_bf16_config(tiny_cfg, tiny_pipe):
    """On the bf16 config: storing the matmul weights in bf16 as they load is bit-exact (the
    reference casts them on every call); the fp32 islands keep fp32 weights. bf16_weights
    off keeps every weight fp32. With every CPU toggle on, the result stays close (bf16
    rounding of tiny differences only)."""
    ref = Run(tiny_pipe)
    off = build_optimized(tiny_cfg)
    assert all(p.dtype == torch.float32 for p in off.high_noise_model.parameters())
    pipe = build_optimized(tiny_cfg, bf16_weights=True)
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
    # the same policy applied by optimize_pipeline to a loaded fp32 pipeline
    adopted = optimize_pipeline(build(tiny_cfg), **replace(
        OptimizationConfig.conservative(), bf16_weights=True).as_dict())
    assert {n: p.dtype for n, p in adopted.high_noise_model.named_parameters()} == dtypes

    pipe = build_optimized(tiny_cfg, bf16_weights=True, **ALL_CPU)
    run = Run(pipe)
    assert [n for _, n in run.calls] == [2] * STEPS
    assert rel_err(run.x0, ref.x0) < 2e-2


@pytest.mark.parametrize('dtype', ['bf16', 'fp32'])
def test_warm_up_runs_both_experts(cfg32, tiny_cfg, dtype):
    pipe = build_optimized(cfg32 if dtype == 'fp32' else tiny_cfg, batched_cfg=True,
                           bf16_weights=dtype == 'bf16')
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


def _plan(scheme):
    plan = cpu_plan(ModelSizes.a14b(), want_batched_cfg=scheme == 'batched')
    return replace(plan, experts=tuple(replace(e, cfg=scheme) for e in plan.experts))


@pytest.mark.parametrize('per_sample_time', [False, True])
def test_batched_cfg_equals_two_passes(cfg32, per_sample_time):
    pipe = build_optimized(cfg32, per_sample_time=per_sample_time)
    latents, ctx, ctx_null = _inputs(pipe)
    model = pipe.high_noise_model
    seen = []
    h = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((len(kwargs.get('x', args[0] if args else None)),
                                             tuple(kwargs['t'].shape))), with_kwargs=True)
    out = {}
    try:
        for scheme in ('sequential', 'batched', 'interleaved'):
            pipe._plan = _plan(scheme)
            with torch.no_grad():
                out[scheme] = pipe._predict_noise(model, latents, torch.tensor(950), ctx,
                                                  ctx_null, 96, 4.0)
    finally:
        pipe._plan = None
        h.remove()
    # interleaved runs the two batch-1 passes through forward_passes (no forward() call)
    assert seen == [(1, (1,)), (1, (1,)), (2, (2,))]
    assert out['batched'].shape == (16, 3, 8, 16)
    assert rel_err(out['batched'], out['sequential']) < 1e-5
    # two passes block by block: the same operations as one after the other, bit for bit
    assert torch.equal(out['interleaved'], out['sequential'])
    out[True] = out['batched']
    # and it is the guided combination, not one branch
    with torch.no_grad():
        c = model([latents], t=torch.tensor([950]), context=[ctx], seq_len=96)[0]
        u = model([latents], t=torch.tensor([950]), context=[ctx_null], seq_len=96)[0]
    assert rel_err(out[True], u + 4.0 * (c - u)) < 1e-5
    assert rel_err(out[True], c) > 1e-3


def test_per_sample_time_equals_per_token(cfg32):
    out = {}
    for per_sample in (False, True):
        pipe = build_optimized(cfg32, per_sample_time=per_sample)
        latents, ctx, _ = _inputs(pipe)
        model = pipe.low_noise_model
        shapes = []
        h = model.time_embedding.register_forward_pre_hook(
            lambda m, args: shapes.append(tuple(args[0].shape)))
        with torch.no_grad():
            out[per_sample] = model([latents], t=torch.tensor([700]), context=[ctx],
                                    seq_len=96)[0]
        h.remove()
        assert shapes == [(1, 1 if per_sample else 96, 256)]
    assert rel_err(out[True], out[False]) < 1e-6


def test_prompt_cache_encodes_once(cfg32):
    for cache in (True, False):
        pipe = build_optimized(cfg32, prompt_cache=cache)
        calls = []
        h = pipe.text_encoder.model.register_forward_pre_hook(lambda m, a: calls.append(1))
        try:
            a, b = pipe._encode_text(['same prompt', 'same prompt'], False)
            assert len(calls) == (1 if cache else 2) and torch.equal(a, b)
            if not cache:
                continue
            (c,) = pipe._encode_text(['same prompt'], False)
            assert len(calls) == 1 and torch.equal(a, c)
            pipe._encode_text(['another prompt'], False)
            assert len(calls) == 2
            # two generate() calls with one prompt: prompt and negative prompt encoded once
            calls.clear()
            for _ in range(2):
                Run(pipe, sampling_steps=1, frame_num=1)
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
    assert isinstance(out, WanT2VOptimized) and isinstance(out, WanT2V)
    assert type(pipe) is WanT2V  # no class swap: a new pipeline around the same models
    assert out.opt.batched_cfg is False and out.opt.per_sample_time is True
    assert all(a is b for a, b in zip(params, out.low_noise_model.parameters()))
    assert out.vae is pipe.vae and out.text_encoder is pipe.text_encoder
    with pytest.raises(ValueError):
        optimize_pipeline(out)
    with pytest.raises(ValueError):
        OptimizationConfig(compile_mode='fastest')


def test_plan_for_on_a_simulated_gpu(cfg32, monkeypatch):
    """plan_for on a (simulated) GPU with A14B-sized experts: what is free plus our own
    models is the budget; offload_model=True streams both experts; a budget smaller than the
    activations is refused in one line before anything moves."""
    import wan.text2video_optimized as opt
    from wan.utils.memory_plan import ModelSizes, PlacementError
    pipe = build_optimized(cfg32, per_sample_time=True)
    pipe.device = torch.device('cuda:0')
    seen = {}
    monkeypatch.setattr(pipe, '_model_sizes', lambda steps, experts=None: (
        seen.setdefault('steps', steps), ModelSizes.a14b(steps))[1])
    monkeypatch.setattr(pipe, '_our_bytes', lambda: (0, 0))
    free = {'gpu': 79.1 * GiB}
    monkeypatch.setattr(opt, 'usable_gpu_bytes', lambda device, cap=None: free['gpu'])
    monkeypatch.setattr(opt, 'usable_host_bytes', lambda: 120 * GiB)

    plan = pipe.plan_for((1280, 720), 81)
    assert plan.fits and plan.all_resident and not plan.batched_cfg
    assert seen['steps'] == (26, 14)  # the config's 40-step schedule at the boundary
    assert pipe.plan_for((832, 480), 81, batched_cfg=True).batched_cfg
    assert pipe.plan_for((832, 480), 81, offload_model=True).streamed == (
        'high_noise', 'low_noise')
    free['gpu'] = 24 * GiB
    plan = pipe.plan_for((1280, 720), 81, steps=(2, 2))
    assert plan.fits and plan.streamed == ('high_noise', 'low_noise')
    assert {e.cfg for e in plan.experts} == {'interleaved'}  # one block copy per step
    free['gpu'] = 8 * GiB
    plan = pipe.plan_for((1280, 720), 81)
    assert not plan.fits and 'activations' in plan.error
    # a cap counts our own resident weights in: 53 GiB held, cap 24 -> a 24 GiB budget
    free['gpu'] = 80 * GiB
    monkeypatch.setattr(pipe, '_our_bytes', lambda: (53 * GiB, 0))
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: 53 * GiB + 5)
    pipe.gpu_memory_gib = 24
    assert pipe._budgets()[0] == 24 * GiB - 5
    assert pipe.plan_for((1280, 720), 81, steps=(2, 2)).streamed == ('high_noise', 'low_noise')
    with pytest.raises(PlacementError, match='GPU budget'):
        plan.raise_if_unfit()


def test_measured_decode_probe_feeds_the_plan_and_decode_evicts_what_it_says(cfg32,
                                                                             monkeypatch):
    """The probe's measured peak (plus the whole output video, held ~3 times while it is
    assembled) replaces the planner's per-pixel estimate; decode() moves out exactly the
    experts the plan lists, and remembers them for the next call."""
    import wan.text2video_optimized as opt
    pipe = build_optimized(cfg32, per_sample_time=True)
    pipe.device = torch.device('cuda:0')
    captured = {}
    monkeypatch.setattr(opt, 'usable_gpu_bytes', lambda device, cap=None: 40 * GiB)
    monkeypatch.setattr(opt, 'usable_host_bytes', lambda: 64 * GiB)
    real = opt.plan_memory

    def spy(*a, **k):
        captured.update(k)
        return real(*a, **k)

    monkeypatch.setattr(opt, 'plan_memory', spy)
    pipe.plan_for(SIZE, FRAMES)
    assert captured['vae_decode_bytes_measured'] is None  # never probed at this size
    pipe._vae_probe[(8, 16)] = 5 * 2**20
    pipe.plan_for(SIZE, FRAMES)
    assert captured['vae_decode_bytes_measured'] == 5 * 2**20 + 3 * (3 * FRAMES * 128 * 64 * 4)

    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: None)
    pipe._plan = replace(pipe.plan_for(SIZE, FRAMES), decode_leaves=('low_noise',))
    video = pipe.decode(torch.zeros(16, 3, 8, 16))
    assert video.shape == (3, FRAMES, 64, 128) and pipe._evicted == {'low_noise'}
    pipe._plan = None


def test_vae_probe_is_gpu_only(opt_pipe):
    opt_pipe._vae_probe = {}
    opt_pipe._probe_vae((128, 64))
    assert opt_pipe._vae_probe == {}  # CPU: nothing to autotune, no GPU memory to measure


def test_attention_kernels_picked_per_shape(cfg32, monkeypatch):
    """With attention='auto' and several fast kernels, self- and cross-attention each take
    the one timed fastest on their own shape (Ulysses: self-attention with a rank's share of
    the heads, cross-attention with its share of the tokens); timings are kept per shape.
    A named kernel is never overridden."""
    import importlib
    attn = importlib.import_module('wan.modules.attention')
    timed = []

    def fake_times(backends, q_shape, k_shape, device):
        timed.append((tuple(backends), q_shape, k_shape))
        cross = k_shape[1] == cfg32.text_len
        return {'fa3': 2.0 if cross else 5.0, 'cudnn': 3.0 if cross else 4.0}
    monkeypatch.setattr(attn, 'available_backends', lambda: ['fa3', 'cudnn', 'sdpa'])
    monkeypatch.setattr(attn, 'time_backends', fake_times)
    pipe = build_optimized(cfg32, attention='auto')
    pipe.device = torch.device('cuda')  # the pick only runs on a GPU; timings are faked
    pipe.sp_size = 2
    heads, head_dim = cfg32.num_heads, cfg32.dim // cfg32.num_heads
    pipe._pick_attention_kernels(1, 64)
    assert timed == [(('fa3', 'cudnn'), (1, 64, heads // 2, head_dim), (1, 64, heads // 2,
                                                                         head_dim)),
                     (('fa3', 'cudnn'), (1, 32, heads, head_dim),
                      (1, cfg32.text_len, heads, head_dim))]
    for model in pipe.experts():
        assert model.options.attn_backend == 'cudnn'
        assert model.options.cross_attn_backend == 'fa3'
        assert model.blocks[0].self_attn.options is model.options
    assert pipe.attention_backend == 'cudnn'
    pipe._pick_attention_kernels(1, 64)
    assert len(timed) == 2  # the same shapes are timed once per pipeline
    for model in pipe.experts():
        model.options.attn_backend = 'sdpa'
    pipe._pick_attention_kernels(1, 64)  # ... and the picks applied again (generate())
    assert pipe.low_noise_model.options.attn_backend == 'cudnn'

    named = build_optimized(cfg32, attention='sdpa')
    named.device = torch.device('cuda')
    named._pick_attention_kernels(1, 64)
    assert len(timed) == 2 and named.low_noise_model.options.attn_backend == 'sdpa'


def test_time_backends_runs_each_kernel():
    from wan.modules.attention import time_backends
    times = time_backends(['sdpa'], (1, 16, 2, 8), (1, 8, 2, 8), 'cpu', dtype=torch.float32)
    assert list(times) == ['sdpa'] and times['sdpa'] > 0


def test_time_backends_leaves_out_a_kernel_that_fails(monkeypatch, caplog):
    import importlib
    attn = importlib.import_module('wan.modules.attention')
    real = attn.attention

    def flaky(q, k, v, backend=None, **kw):
        if backend == 'sdpa_flash':
            raise RuntimeError('No available kernel for this shape\nmore')
        return real(q, k, v, backend='sdpa', **kw)
    monkeypatch.setattr(attn, 'attention', flaky)
    times = attn.time_backends(['sdpa_flash', 'sdpa'], (1, 8, 2, 8), (1, 8, 2, 8), 'cpu',
                               dtype=torch.float32)
    assert list(times) == ['sdpa']
    assert 'sdpa_flash left out' in caplog.text and 'No available kernel' in caplog.text
