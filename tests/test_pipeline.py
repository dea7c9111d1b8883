"""WanT2V on the tiny config (CPU): the denoising loop, CFG, expert switch, offload logic,
seeding, output shape, solvers, checkpoint errors and loading a released-layout folder
(docs/PIPELINE.md; docs/PITFALLS.md: frame count, integer timesteps, expert switch,
CFG order, noise generator, one guidance scale on the CLI, expert offload)."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch

from wan.text2video import WanT2V, check_checkpoint_dir
from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

SIZE = (128, 64)  # (W, H): '128*64'
FRAMES = 9
PROMPT = 'a cat plays the piano'

# docs/SOLVERS.md#integer-timesteps: 40 steps, shift 12
UNIPC_40 = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952,
            947, 941, 936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776,
            749, 717, 678, 631, 571, 492, 386, 235]
DPM_40 = [1000, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 957, 952,
          947, 941, 936, 929, 923, 915, 907, 898, 888, 878, 865, 852, 837, 819, 800, 776, 750,
          717, 679, 631, 571, 493, 387, 235]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

class Recorder:
    """Wrap both experts' forward: record every call, optionally replace the model by `fake`.

    `fake(expert_name, x, t, context)` returns the list of velocities.
    """

    def __init__(self, pipe, monkeypatch, fake=None):
        self.calls = []
        for name in ('high_noise_model', 'low_noise_model'):
            model = getattr(pipe, name)
            orig = model.forward

            def forward(x, t, context, seq_len, y=None, _name=name, _orig=orig):
                out = fake(_name, x, t, context) if fake is not None else \
                    _orig(x, t, context, seq_len, y)
                self.calls.append(dict(expert=_name, t=t.clone(), seq_len=seq_len,
                                       x=[u.clone() for u in x],
                                       context=[c.clone() for c in context],
                                       out=[o.clone() for o in out]))
                return out

            monkeypatch.setattr(model, 'forward', forward)


def skip_decode(pipe, monkeypatch):
    """Replace the VAE decode by the identity (returns the final latents); collects x0."""
    seen = []

    def decode(x0):
        seen.append(x0.clone())
        return x0

    monkeypatch.setattr(pipe, 'decode', decode)
    return seen


def record_scheduler(pipe, monkeypatch):
    """Record (model_output, timestep, sample) of every scheduler.step call."""
    steps = []

    def make_scheduler(*args, **kwargs):
        scheduler, timesteps = WanT2V.make_scheduler(*args, **kwargs)
        orig = scheduler.step

        def step(model_output, timestep, sample, *a, **k):
            steps.append(dict(v=model_output.clone(), t=timestep.clone(), x=sample.clone()))
            return orig(model_output, timestep, sample, *a, **k)

        scheduler.step = step
        return scheduler, timesteps

    monkeypatch.setattr(pipe, 'make_scheduler', make_scheduler)
    return steps


def encode(pipe, text):
    with torch.no_grad():
        return pipe.text_encoder([text], torch.device('cpu'))[0]


def gen(pipe, cfg, **kw):
    args = dict(size=SIZE, frame_num=FRAMES, shift=cfg.sample_shift, sample_solver='unipc',
                sampling_steps=cfg.sample_steps, guide_scale=cfg.sample_guide_scale, seed=42,
                offload_model=True)
    args.update(kw)
    return pipe.generate(PROMPT, **args)


def fake_velocity(ctx_cond, ctx_uncond):
    """Deterministic stand-ins for the experts: different for cond/uncond and per expert."""

    def fake(name, x, t, context):
        if torch.equal(context[0], ctx_cond):
            a, b = 0.7, 0.3
        elif torch.equal(context[0], ctx_uncond):
            a, b = -0.4, -0.1
        else:
            raise AssertionError('unexpected context')
        c = 0.05 if name == 'high_noise_model' else -0.02
        return [(a * u + b * t.float() / 1000 + c).float() for u in x]

    return fake


# ---------------------------------------------------------------------------------------------
# the denoising loop
# ---------------------------------------------------------------------------------------------

def test_model_calls_40_steps_unipc(tiny_pipe, tiny_cfg, monkeypatch):
    """26 high-noise then 14 low-noise steps; cond before uncond; int64 timesteps 999...;
    context = T5(prompt) then T5(default negative prompt); seq_len and t shape."""
    rec = Recorder(tiny_pipe, monkeypatch)
    skip_decode(tiny_pipe, monkeypatch)
    gen(tiny_pipe, tiny_cfg)

    ctx = encode(tiny_pipe, PROMPT)
    ctx_null = encode(tiny_pipe, tiny_cfg.sample_neg_prompt)
    assert tiny_pipe.sample_neg_prompt == tiny_cfg.sample_neg_prompt
    assert not torch.equal(ctx[:1], ctx_null[:1])

    calls = rec.calls
    assert len(calls) == 80
    experts = [c['expert'] for c in calls[::2]]
    assert experts == ['high_noise_model'] * 26 + ['low_noise_model'] * 14

    sched = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
                                        use_dynamic_shifting=False)
    sched.set_timesteps(40, device='cpu', shift=12.0)
    assert sched.timesteps.tolist() == UNIPC_40

    _, t_lat, h_lat, w_lat = tiny_pipe.target_shape(SIZE, FRAMES)
    assert (t_lat, h_lat, w_lat) == (3, 8, 16)
    seq_len = math.ceil(h_lat * w_lat / 4 * t_lat)
    for i, t_expected in enumerate(UNIPC_40):
        cond, uncond = calls[2 * i], calls[2 * i + 1]
        assert cond['expert'] == uncond['expert']
        for c in (cond, uncond):
            assert c['t'].shape == (1,) and c['t'].dtype == torch.int64
            assert int(c['t'][0]) == t_expected
            assert c['seq_len'] == seq_len == 96
            assert len(c['x']) == 1 and c['x'][0].shape == (16, 3, 8, 16)
            assert len(c['context']) == 1
        assert torch.equal(cond['x'][0], uncond['x'][0])
        assert torch.equal(cond['context'][0], ctx), f'step {i}: first pass is not conditional'
        assert torch.equal(uncond['context'][0], ctx_null), f'step {i}: second pass not uncond'


def test_explicit_negative_prompt_is_used(tiny_pipe, tiny_cfg, monkeypatch):
    ctx = encode(tiny_pipe, PROMPT)
    neg = 'blurry, static'
    ctx_neg = encode(tiny_pipe, neg)
    rec = Recorder(tiny_pipe, monkeypatch, fake=fake_velocity(ctx, ctx_neg))
    skip_decode(tiny_pipe, monkeypatch)
    gen(tiny_pipe, tiny_cfg, sampling_steps=2, n_prompt=neg)
    assert [torch.equal(c['context'][0], ctx_neg) for c in rec.calls] == [False, True] * 2


@pytest.mark.parametrize('guide_scale,low,high', [
    ((3.0, 4.0), 3.0, 4.0),     # the config default: (low-noise, high-noise)
    ((2.0, 7.0), 2.0, 7.0),
    (5.0, 5.0, 5.0),            # a float applies to both experts
])
def test_guidance_formula(tiny_pipe, tiny_cfg, monkeypatch, guide_scale, low, high):
    """The value handed to scheduler.step is u + s(c - u), s = high for t >= 875 else low;
    the whole loop recomputed by hand (seeded noise + scheduler) gives the same x0."""
    ctx = encode(tiny_pipe, PROMPT)
    ctx_null = encode(tiny_pipe, tiny_cfg.sample_neg_prompt)
    fake = fake_velocity(ctx, ctx_null)
    rec = Recorder(tiny_pipe, monkeypatch, fake=fake)
    steps = record_scheduler(tiny_pipe, monkeypatch)
    x0_seen = skip_decode(tiny_pipe, monkeypatch)
    n = 10  # 7 high-noise and 3 low-noise steps at shift 12
    gen(tiny_pipe, tiny_cfg, sampling_steps=n, guide_scale=guide_scale, seed=7)

    assert len(steps) == n and len(rec.calls) == 2 * n
    scales = []
    for i, st in enumerate(steps):
        cond = next(c for c in rec.calls[2 * i:2 * i + 2] if torch.equal(c['context'][0], ctx))
        unc = next(c for c in rec.calls[2 * i:2 * i + 2]
                   if torch.equal(c['context'][0], ctx_null))
        c, u = cond['out'][0], unc['out'][0]
        s = high if int(st['t']) >= 875 else low
        scales.append(s)
        assert st['v'].shape == (1, 16, 3, 8, 16) and st['v'].dtype == torch.float32
        torch.testing.assert_close(st['v'][0], u + s * (c - u), rtol=1e-6, atol=1e-6)
        assert torch.equal(st['x'][0], cond['x'][0])
    assert scales == [high] * 7 + [low] * 3

    # by hand: one seeded randn of the latent shape, the same scheduler, the same formula
    shape = tiny_pipe.target_shape(SIZE, FRAMES)
    latents = torch.randn(*shape, dtype=torch.float32,
                          generator=torch.Generator('cpu').manual_seed(7))
    sched, timesteps = WanT2V.make_scheduler('unipc', n, tiny_cfg.sample_shift, 'cpu')
    for t in timesteps:
        name = 'high_noise_model' if t.item() >= 875 else 'low_noise_model'
        s = high if t.item() >= 875 else low
        tt = t[None]
        c = fake(name, [latents], tt, [ctx])[0]
        u = fake(name, [latents], tt, [ctx_null])[0]
        latents = sched.step((u + s * (c - u))[None], t, latents[None],
                             return_dict=False)[0][0]
    assert len(x0_seen) == 1
    torch.testing.assert_close(x0_seen[0], latents, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# expert choice and offload placement
# ---------------------------------------------------------------------------------------------

def test_expert_boundary_on_integer_timestep(tiny_pipe):
    b = tiny_pipe.boundary * tiny_pipe.num_train_timesteps
    assert b == 875
    for t, name in [(1000, 'high'), (999, 'high'), (875, 'high'), (874, 'low'), (0, 'low')]:
        for offload in (True, False):
            got = tiny_pipe._prepare_model_for_timestep(torch.tensor(t), b, offload)
            assert got is getattr(tiny_pipe, f'{name}_noise_model'), (t, offload)


class _FakeParam:
    def __init__(self, device):
        self.device = torch.device(device)


class _FakeExpert:
    """Just enough of an nn.Module for the placement logic: a device and .to()."""

    def __init__(self, name, device, log):
        self.name, self.p, self.log = name, _FakeParam(device), log

    def parameters(self):
        yield self.p

    def to(self, device):
        self.p.device = torch.device(device)
        self.log.append((self.name, str(self.p.device)))
        return self

    def cpu(self):
        return self.to('cpu')


def _fake_gpu_pipe(init_on_cpu, start):
    log = []
    pipe = WanT2V.__new__(WanT2V)
    pipe.device = torch.device('cuda:0')  # only compared, never used
    pipe.init_on_cpu = init_on_cpu
    pipe.high_noise_model = _FakeExpert('high', start, log)
    pipe.low_noise_model = _FakeExpert('low', start, log)
    return pipe, log


@pytest.mark.parametrize('init_on_cpu,offload,start,expected', [
    # single GPU default: swaps even with offload_model False (docs/PITFALLS.md#expert-offload)
    (True, False, 'cpu', [('high', 'cuda:0'), ('high', 'cpu'), ('low', 'cuda:0')]),
    (True, True, 'cpu', [('high', 'cuda:0'), ('high', 'cpu'), ('low', 'cuda:0')]),
    # both resident (init_on_cpu False, no offload): no movement at all
    (False, False, 'cuda:0', []),
    # resident at start but offloading: the unused expert leaves first
    (False, True, 'cuda:0', [('low', 'cpu'), ('high', 'cpu'), ('low', 'cuda:0')]),
])
def test_offload_placement_fake_gpu(init_on_cpu, offload, start, expected):
    pipe, log = _fake_gpu_pipe(init_on_cpu, start)
    used = []
    for t in UNIPC_40:
        m = pipe._prepare_model_for_timestep(torch.tensor(t), 875.0, offload)
        used.append(m.name)
        assert m.p.device == (torch.device('cuda:0'))
        other = pipe.low_noise_model if m.name == 'high' else pipe.high_noise_model
        if init_on_cpu or offload:
            assert other.p.device.type == 'cpu'
    assert used == ['high'] * 26 + ['low'] * 14
    assert log == expected


def test_offload_model_moves_experts_to_cpu_after_loop(tiny_pipe, tiny_cfg, monkeypatch):
    events = []
    for name in ('low_noise_model', 'high_noise_model'):
        m = getattr(tiny_pipe, name)
        orig = m.cpu
        monkeypatch.setattr(m, 'cpu', lambda _n=name, _o=orig: events.append(_n) or _o())
    monkeypatch.setattr(tiny_pipe, 'decode', lambda x0: events.append('decode') or x0)
    ctx = encode(tiny_pipe, PROMPT)
    Recorder(tiny_pipe, monkeypatch,
             fake=fake_velocity(ctx, encode(tiny_pipe, tiny_cfg.sample_neg_prompt)))
    gen(tiny_pipe, tiny_cfg, sampling_steps=2, offload_model=True)
    assert events == ['low_noise_model', 'high_noise_model', 'decode']
    events.clear()
    gen(tiny_pipe, tiny_cfg, sampling_steps=2, offload_model=False)
    assert events == ['decode']


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

def test_seed_determinism_and_output_shape(tiny_pipe, tiny_cfg):
    a = gen(tiny_pipe, tiny_cfg, sampling_steps=3, seed=123)
    b = gen(tiny_pipe, tiny_cfg, sampling_steps=3, seed=123)
    c = gen(tiny_pipe, tiny_cfg, sampling_steps=3, seed=124)
    assert a.shape == (3, 9, 64, 128) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_portrait_size_and_frame_count(tiny_pipe, tiny_cfg):
    """'64*128' is 64 wide, 128 high; frame_num 5 gives T' = 2 and 4(T'-1)+1 = 5 frames."""
    assert tiny_pipe.target_shape((64, 128), 5) == (16, 2, 16, 8)
    v = gen(tiny_pipe, tiny_cfg, size=(64, 128), frame_num=5, sampling_steps=2)
    assert v.shape == (3, 5, 128, 64)
    assert float(v.min()) >= -1 and float(v.max()) <= 1


def test_dpmpp_solver(tiny_pipe, tiny_cfg, monkeypatch):
    rec = Recorder(tiny_pipe, monkeypatch)
    x0 = skip_decode(tiny_pipe, monkeypatch)
    gen(tiny_pipe, tiny_cfg, sample_solver='dpm++')
    ts = [int(c['t'][0]) for c in rec.calls[::2]]
    assert ts == DPM_40
    assert [c['expert'] for c in rec.calls[::2]] == \
        ['high_noise_model'] * 26 + ['low_noise_model'] * 14
    assert torch.isfinite(x0[0]).all()
    # and it is a different solver than UniPC
    skip_decode(tiny_pipe, monkeypatch)
    x0_unipc = gen(tiny_pipe, tiny_cfg, sampling_steps=40)
    assert not torch.allclose(x0[0], x0_unipc)


def test_unknown_solver(tiny_pipe, tiny_cfg, monkeypatch):
    skip_decode(tiny_pipe, monkeypatch)
    with pytest.raises(NotImplementedError, match='solver'):
        gen(tiny_pipe, tiny_cfg, sample_solver='heun', sampling_steps=2)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def test_missing_checkpoint_dir(tmp_path, tiny_cfg, no_model_build):
    missing = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='nowhere'):
        WanT2V(tiny_cfg, missing)
    with pytest.raises(FileNotFoundError):
        WanT2V(tiny_cfg, None)


def test_incomplete_checkpoint_dir_names_missing_files(tmp_path, tiny_cfg, no_model_build):
    ckpt = tmp_path / 'ckpt'
    (ckpt / 'google' / 'umt5-xxl').mkdir(parents=True)
    (ckpt / 'Wan2.1_VAE.pth').write_bytes(b'x')
    (ckpt / 'low_noise_model').mkdir()
    (ckpt / 'low_noise_model' / 'config.json').write_text('{}')
    (ckpt / 'low_noise_model' / 'diffusion_pytorch_model.safetensors').write_bytes(b'x')
    with pytest.raises(FileNotFoundError) as err:
        WanT2V(tiny_cfg, str(ckpt))
    msg = str(err.value)
    assert 'models_t5_umt5-xxl-enc-bf16.pth' in msg
    assert os.path.join('high_noise_model', 'config.json') in msg
    assert 'Wan2.1_VAE.pth' not in msg and 'low_noise_model' not in msg
    # the check itself, without the constructor
    with pytest.raises(FileNotFoundError, match='high_noise_model'):
        check_checkpoint_dir(tiny_cfg, str(ckpt))


def test_load_released_layout(released_ckpt, tiny_pipe, tiny_cfg):
    """The tiny pipeline written in the released checkpoint layout (tests/conftest.py) loads
    back to the same weights and generates."""
    ckpt = released_ckpt
    for sub in ('low_noise_model', 'high_noise_model'):
        shards = glob.glob(str(ckpt / sub / '*.safetensors'))
        assert len(shards) > 1
        with open(ckpt / sub / 'diffusion_pytorch_model.safetensors.index.json') as f:
            assert set(json.load(f)['weight_map']) == set(getattr(tiny_pipe, sub).state_dict())

    pipe = WanT2V(tiny_cfg, str(ckpt))
    assert not pipe.random_init
    for attr in ('low_noise_model', 'high_noise_model'):
        saved, loaded = getattr(tiny_pipe, attr).state_dict(), getattr(pipe, attr).state_dict()
        assert saved.keys() == loaded.keys()
        for k in saved:
            assert loaded[k].dtype == torch.float32 and torch.equal(saved[k], loaded[k]), k
    for a, b in [(tiny_pipe.text_encoder.model, pipe.text_encoder.model),
                 (tiny_pipe.vae.model, pipe.vae.model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert pipe.text_encoder.model.token_embedding.weight.dtype == torch.bfloat16
    assert type(pipe.text_encoder.tokenizer).__name__ == 'HuggingfaceTokenizer'
    ids = pipe.text_encoder.tokenizer(['a cat'], return_mask=False)
    assert ids.shape == (1, 512) and ids[0, :3].tolist() == [3, 4, 1]

    video = pipe.generate('a cat plays the piano', size=SIZE, frame_num=5, shift=12.0,
                          sampling_steps=2, guide_scale=(3.0, 4.0), seed=1)
    assert video.shape == (3, 5, 64, 128) and torch.isfinite(video).all()


def test_stages_are_announced_to_observers(tiny_pipe):
    from wan.utils.timing import PipelineObserver, STAGES

    class Log(PipelineObserver):
        def __init__(self):
            self.events = []

        def stage_started(self, name, info):
            self.events.append(('start', name, info.get('expert')))

        def stage_finished(self, name, info):
            self.events.append(('end', name, info.get('expert')))
            if name == 'decode':
                self.latent = info['latent']

    log = tiny_pipe.add_observer(Log())
    try:
        video = tiny_pipe.generate(PROMPT, size=SIZE, frame_num=FRAMES, shift=12.0,
                                   sampling_steps=4, guide_scale=(3.0, 4.0), seed=3)
    finally:
        tiny_pipe.remove_observer(log)
    names = [n for kind, n, _ in log.events if kind == 'start']
    assert set(names) == set(STAGES)
    assert names[0] == 'text_encode' and names[-2:] == ['decode', 'vae_decode']
    steps = [e for kind, n, e in log.events if kind == 'start' and n == 'step']
    assert steps == ['high', 'high', 'high', 'low']  # 999, 972, 922 | 799 at shift 12, 4 steps
    # every stage that started finished, innermost first
    assert log.events.count(('end', 'vae_decode', None)) == 1
    assert log.events.index(('end', 'vae_decode', None)) < \
        log.events.index(('end', 'decode', None))
    assert log.latent.shape == (16, 3, SIZE[1] // 8, SIZE[0] // 8)
    assert video.shape == (3, FRAMES, SIZE[1], SIZE[0])
