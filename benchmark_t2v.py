"""Benchmark the reference path (WanT2V) against the optimized one (WanT2VOptimized).

Both modes run in one process on the same weights (the optimized mode upgrades the very same
pipeline in place with optimize_pipeline), the same seed and the same prompt, so that speed-up
ratios and output agreement come from one run on one GPU.

    python benchmark_t2v.py --mode both --size 1280*720 --sample_steps 4 --save_results
    python benchmark_t2v.py --mode optimized --size 832*480 --ablate --save_results
    python benchmark_t2v.py --task t2v-tiny --mode both            # CPU smoke test
    torchrun --nproc_per_node=4 benchmark_t2v.py --mode optimized --ulysses_size 4
    python benchmark_t2v.py --mode optimized --scaling 1 2 4 --output scaling.json

Under torchrun every rank runs the same pipeline (Ulysses / CFG parallel / FSDP as asked);
rank 0 times, decodes and writes the JSON, with the peak memory of every rank. `--scaling`
launches one torchrun per GPU count in turn (one process per GPU, Ulysses over all of them,
or `Nc` for CFG parallelism x Ulysses N/2) and writes the per-step time at N GPUs against 1
GPU, the scaling efficiency and the projected 40-step totals into one JSON.

Measured per mode: model build/load, T5 encode, DiT time per denoising step for each expert
(CUDA events, median over the steps after --warmup), expert switch/offload cost, VAE decode,
end-to-end generate(), peak GPU memory, first-step overhead (compile included), achieved
TFLOP/s. Measured once: the ceilings (bf16 GEMM rate, every available attention kernel at
this size) and from them the floor per forward. 40-step totals are labelled "projected from
measured stages". A short benchmark needs both experts to run in few steps, so by default the
boundary is moved to split the steps evenly between the experts (recorded in the JSON); the
projection uses the real 40-step split (26 high-noise, 14 low-noise for t2v-A14B).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Dict, Optional

import torch

from wan.text2video_optimized import OptimizationConfig  # noqa: E402

TOGGLES = ('batched_cfg', 'per_sample_time', 'fast_rope', 'bf16_weights', 'compile', 'tf32',
           'vae_cudnn_benchmark', 'vae_channels_last')


# ----------------------------------------------------------------------------- ranks
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def all_ranks(value) -> list:
    """`value` from every rank, in rank order ([value] without a process group)."""
    if not _distributed():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------------------- timing
class Timer:
    """Wall time on CPU; CUDA events bracketed by synchronisation on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'

    @contextmanager
    def __call__(self, out: list):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            yield
            out.append(time.perf_counter() - t0)


def instrument(pipe, timer: Timer) -> Dict[str, list]:
    """Wrap the pipeline's stage hooks with timers; returns the lists they fill."""
    rec = {'t5': [], 'switch': [], 'step': [], 'step_expert': [], 'decode': [], 'x0': [],
           'vae': []}
    boundary_t = pipe.boundary * pipe.num_train_timesteps
    hooks = {'_encode_text': 't5', '_prepare_model_for_timestep': 'switch',
             '_predict_noise': 'step', 'decode': 'decode'}
    for attr, key in hooks.items():
        fn = getattr(type(pipe), attr)

        def wrapped(*a, _fn=fn, _key=key, **k):
            with timer(rec[_key]):
                out = _fn(pipe, *a, **k)
            if _key == 'step':
                rec['step_expert'].append('high' if a[2].item() >= boundary_t else 'low')
            if _key == 'decode':
                rec['x0'].append(a[0].detach().float().cpu())
            return out

        setattr(pipe, attr, wrapped)
    # the VAE alone: the pipeline's decode stage may also move the experts off the GPU first
    vae_decode = type(pipe.vae).decode

    def timed_vae_decode(*a, **k):
        with timer(rec['vae']):
            return vae_decode(pipe.vae, *a, **k)

    pipe.vae.decode = timed_vae_decode
    return rec


def uninstrument(pipe) -> None:
    for attr in ('_encode_text', '_prepare_model_for_timestep', '_predict_noise', 'decode'):
        pipe.__dict__.pop(attr, None)
    pipe.vae.__dict__.pop('decode', None)


# ----------------------------------------------------------------------------- FLOPs
def forward_flops(cfg, tokens: int) -> Dict[str, float]:
    d, f, n, ctx = cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.text_len
    gemm = n * (12 * tokens * d * d + 4 * tokens * d * f + 4 * ctx * d * d)
    attn = n * 4 * tokens * tokens * d
    cross = n * 4 * tokens * ctx * d
    return {'gemm': float(gemm), 'self_attention': float(attn), 'cross_attention': float(cross),
            'total': float(gemm + attn + cross)}


def measure_ceilings(cfg, tokens: int, device: torch.device, reps: int = 5) -> dict:
    """bf16 GEMM rate and each available attention kernel's time at this size."""
    from wan.modules.attention import attention, available_backends
    out = {'gemm_bf16_tflops': None, 'attention': {}}
    if device.type != 'cuda':
        return out
    timer = Timer(device)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps * 2):
        with timer(times):
            a @ b
    out['gemm_bf16_tflops'] = 2 * n**3 / statistics.median(times) / 1e12
    del a, b
    h, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    q, k, v = (torch.randn(1, tokens, h, hd, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    flops = 4 * tokens * tokens * h * hd
    for backend in available_backends():
        try:
            attention(q, k, v, backend=backend)
            times = []
            for _ in range(reps):
                with timer(times):
                    attention(q, k, v, backend=backend)
            t = statistics.median(times)
            out['attention'][backend] = {'seconds': t, 'tflops': flops / t / 1e12}
        except Exception as exc:  # a kernel that is importable but fails at this shape
            out['attention'][backend] = {'error': repr(exc)[:200]}
    del q, k, v
    torch.cuda.empty_cache()
    return out


def floor_per_forward(cfg, tokens: int, ceilings: dict) -> Optional[dict]:
    ok = {k: v['seconds'] for k, v in ceilings['attention'].items() if 'seconds' in v}
    if not ok or not ceilings['gemm_bf16_tflops']:
        return None
    best = min(ok, key=ok.get)
    gemm_s = forward_flops(cfg, tokens)['gemm'] / (ceilings['gemm_bf16_tflops'] * 1e12)
    attn_s = cfg.num_layers * ok[best]
    return {'attention_kernel': best, 'attention_seconds': attn_s, 'gemm_seconds': gemm_s,
            'seconds': attn_s + gemm_s}


# ----------------------------------------------------------------------------- one mode
def summarize_steps(rec: dict, warmup: int) -> dict:
    res = {}
    for expert in ('high', 'low'):
        times = [t for t, e in zip(rec['step'], rec['step_expert']) if e == expert]
        timed = times[warmup:] if len(times) > warmup else times[-1:]
        res[expert] = {
            'all_seconds': times,
            'median_seconds': statistics.median(timed) if timed else None,
            'first_step_overhead_seconds':
                (times[0] - statistics.median(timed)) if times and timed else None,
            'timed_steps': len(timed) if times else 0,
        }
    return res


def run_mode(pipe, args, size, label: str, seed: int, offload_model: bool,
             generate_kwargs: dict) -> dict:
    device = pipe.device
    timer = Timer(device)
    rec = instrument(pipe, timer)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    logging.info('[%s] generate: %s, %d frames, %d steps', label, args.size, args.frame_num,
                 args.sample_steps)
    e2e = []
    video = None
    for run in range(args.num_runs):
        rec_run_start = len(rec['step'])
        with timer(e2e):
            video = pipe.generate(args.prompt, size=size, frame_num=args.frame_num,
                                  shift=args.sample_shift, sample_solver=args.sample_solver,
                                  sampling_steps=args.sample_steps, guide_scale=args.guide_scale,
                                  seed=seed, offload_model=offload_model, **generate_kwargs)
        logging.info('[%s] run %d: %.2f s (%d steps)', label, run, e2e[-1],
                     len(rec['step']) - rec_run_start)
    uninstrument(pipe)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    # every rank's peak (one process per GPU); the headline is the largest
    peaks = all_ranks(peak)
    steps = summarize_steps(rec, args.warmup)
    return {'label': label, 'end_to_end_seconds': e2e, 't5_seconds': rec['t5'],
            'switch_seconds': rec['switch'], 'decode_seconds': rec['decode'],
            'vae_decode_seconds': rec['vae'],
            'steps': steps, 'peak_gpu_gib': None if peak is None else max(peaks),
            'peak_gpu_gib_per_rank': peaks, 'video': video,
            'x0': rec['x0'][-1] if rec['x0'] else None}


def agreement(ref: dict, other: dict) -> dict:
    """Decoded-video PSNR / abs diffs and final-latent relative error between two runs."""
    vb, vo = ref['video'].float(), other['video'].float()
    xb, xo = ref['x0'], other['x0']
    return {'psnr_db': psnr(vb, vo), 'max_abs_diff': (vb - vo).abs().max().item(),
            'mean_abs_diff': (vb - vo).abs().mean().item(), 'video_shape': list(vb.shape),
            'video_std_reference': vb.std().item(),
            'latent_rel_err': ((xb - xo).norm() / xb.norm()).item() if xb is not None else None}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = (a.float().clamp(-1, 1) + 1) / 2
    b = (b.float().clamp(-1, 1) + 1) / 2
    mse = torch.mean((a - b) ** 2).item()
    return float('inf') if mse == 0 else 10 * math.log10(1.0 / mse)


def project_40(mode: dict, steps_high: int, steps_low: int) -> Optional[float]:
    s = mode['steps']
    if s['high']['median_seconds'] is None or s['low']['median_seconds'] is None:
        return None
    t5 = statistics.median(mode['t5_seconds']) if mode['t5_seconds'] else 0.0
    dec = statistics.median(mode['decode_seconds']) if mode['decode_seconds'] else 0.0
    switch = sum(mode['switch_seconds']) / max(1, len(mode['end_to_end_seconds']))
    return t5 + steps_high * s['high']['median_seconds'] + \
        steps_low * s['low']['median_seconds'] + switch + dec


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=['baseline', 'optimized', 'both'], default='both')
    p.add_argument('--task', default='t2v-A14B')
    p.add_argument('--size', default=None, help='W*H (default 1280*720; t2v-tiny: 128*64)')
    p.add_argument('--frame_num', type=int, default=None)
    p.add_argument('--sample_steps', type=int, default=4)
    p.add_argument('--sample_shift', type=float, default=None)
    p.add_argument('--sample_solver', default='unipc', choices=['unipc', 'dpm++'])
    p.add_argument('--boundary', default='auto',
                   help="'auto' splits the steps evenly between the experts; 'config' keeps "
                        "the config's boundary; or a number in (0, 1)")
    p.add_argument('--warmup', type=int, default=0, help='steps per expert excluded from '
                                                         'the medians')
    p.add_argument('--num_runs', type=int, default=1)
    p.add_argument('--ckpt_dir', default=None, help='real weights (default: --random_init)')
    p.add_argument('--random_init', action='store_true', default=False)
    p.add_argument('--prompt', default='A red fox trots through fresh snow at dawn, cinematic.')
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--convert_model_dtype', dest='convert_model_dtype', action='store_true',
                   default=True, help='bf16 experts in both modes (default; the reference '
                                      'README setting for 80 GB GPUs)')
    p.add_argument('--no-convert_model_dtype', dest='convert_model_dtype', action='store_false')
    p.add_argument('--baseline_attention', default='reference',
                   help="the reference path's kernel ('reference': what upstream would use)")
    p.add_argument('--same_kernel_baseline', action='store_true', default=False,
                   help='also time the reference path with the optimized kernel')
    # optimized toggles
    p.add_argument('--attention', default='auto')
    p.add_argument('--compile_mode', default='default')
    for t in TOGGLES:
        p.add_argument(f'--no-{t}', dest=t, action='store_false',
                       default=getattr(OptimizationConfig(), t))
        p.add_argument(f'--{t}', dest=t, action='store_true')
    p.add_argument('--ablate', nargs='*', default=None,
                   help='optimized mode again with each listed toggle off in turn (default: '
                        'all that are on); DiT steps only')
    p.add_argument('--ablate_steps', type=int, default=4)
    p.add_argument('--profile', action='store_true', help='torch.profiler breakdown of one '
                                                          'forward per mode')
    # multi-GPU (under torchrun), as generate.py
    p.add_argument('--ulysses_size', type=int, default=None,
                   help='Ulysses degree (default under torchrun: every rank, halved with '
                        '--cfg_parallel)')
    p.add_argument('--cfg_parallel', action='store_true', default=False)
    p.add_argument('--dit_fsdp', action='store_true', default=False)
    p.add_argument('--t5_fsdp', action='store_true', default=False)
    p.add_argument('--scaling', nargs='+', default=None, metavar='N',
                   help="launch one torchrun per entry (N GPUs, Ulysses over all; 'Nc': CFG "
                        "parallel x Ulysses N/2) and compare per-step times with N=1")
    p.add_argument('--output', default=None, help='JSON path')
    p.add_argument('--save_results', action='store_true',
                   help='write JSON under bench/results/ (default name from GPU and size)')
    return p.parse_args(argv)


def git_commit() -> Optional[str]:
    # GIT_COMMIT first: a copied working tree can carry a stale .git whose HEAD is not the
    # code that runs
    if os.environ.get('GIT_COMMIT'):
        return os.environ['GIT_COMMIT']
    try:
        return subprocess.check_output(['git', 'rev-parse', 'HEAD'], text=True,
                                       stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return None


def environment(device) -> dict:
    from wan.modules.attention import available_backends
    env = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': platform.python_version(),
           'platform': platform.platform(), 'device': str(device), 'gpu': None,
           'attention_backends': available_backends(), 'git_commit': git_commit(),
           'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
           'date_utc': datetime.now(timezone.utc).isoformat(timespec='seconds')}
    if device.type == 'cuda':
        prop = torch.cuda.get_device_properties(device)
        env['gpu'] = prop.name
        env['gpu_memory_gib'] = prop.total_memory / 2**30
        env['gpu_capability'] = f'{prop.major}.{prop.minor}'
        try:
            env['cudnn'] = torch.backends.cudnn.version()
        except Exception:
            pass
    return env


def choose_boundary(pipe, args) -> Optional[float]:
    if args.boundary == 'config':
        return None
    if args.boundary != 'auto':
        return float(args.boundary)
    _, timesteps = pipe.make_scheduler(args.sample_solver, args.sample_steps, args.sample_shift,
                                       'cpu')
    ts = timesteps.tolist()
    half = len(ts) // 2
    if half == 0:
        return None
    # the largest boundary that sends the first half of the steps to the high-noise expert
    return (ts[half - 1] + ts[half]) / 2 / pipe.num_train_timesteps


def profile_forward(pipe, model, size, frame_num, label) -> dict:
    """CUDA time of one batch-1 forward of `model`, grouped by kernel family."""
    was_on_cpu = next(model.parameters()).device.type == 'cpu'
    if was_on_cpu:
        model.to(pipe.device)
    try:
        return _profile_forward(pipe, model, size, frame_num, label)
    except Exception as exc:  # a profile is a diagnostic: never lose the run for it
        logging.warning('[%s] profile failed: %r', label, exc)
        return {'error': repr(exc)[:300]}
    finally:
        if was_on_cpu:
            model.to('cpu')
            torch.cuda.empty_cache()


def _profile_forward(pipe, model, size, frame_num, label) -> dict:
    from torch.profiler import ProfilerActivity, profile
    shape = pipe.target_shape(size, frame_num)
    seq_len = pipe.seq_len_for(shape)
    lat = torch.randn(*shape, device=pipe.device)
    ctx = torch.randn(20, pipe.config.get('text_dim', 4096), device=pipe.device,
                      dtype=torch.bfloat16)
    t = torch.tensor([900], device=pipe.device)
    with pipe._autocast(), torch.no_grad():
        model([lat], t=t, context=[ctx], seq_len=seq_len)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model([lat], t=t, context=[ctx], seq_len=seq_len)
            torch.cuda.synchronize()
    groups: Dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, 'device_time_total', None) or getattr(evt, 'cuda_time_total', 0)
        if not us or evt.key.startswith(('ProfilerStep', 'aten::', 'cuda')):
            continue
        groups[_kernel_family(evt.key)] = groups.get(_kernel_family(evt.key), 0.0) + us / 1e6
        kernels.append((us / 1e6, evt.count, evt.key[:160]))
    total = sum(groups.values())
    kernels.sort(reverse=True)
    logging.info('[%s] profile: %s', label, {k: round(v, 3) for k, v in groups.items()})
    return {'seconds_by_family': groups, 'total_seconds': total,
            'top_kernels': [{'seconds': t, 'calls': c, 'name': n} for t, c, n in kernels[:25]]}


def _kernel_family(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ('flash', 'fmha', 'attention', 'cudnn_generated_fort_native_sdpa',
                            'sdpa')):
        return 'attention'
    if any(s in n for s in ('gemm', 'sm90_xmma', 'cutlass', 'nvjet', 'cublas', 'matmul')):
        return 'gemm'
    if 'triton' in n:
        return 'fused_triton'
    if 'conv' in n:
        return 'conv'
    if any(s in n for s in ('reduce', 'norm', 'softmax')):
        return 'reduction_norm'
    if any(s in n for s in ('copy', 'cat', 'memcpy', 'memset', 'fill')):
        return 'copy_cast'
    if any(s in n for s in ('elementwise', 'vectorized', 'unrolled', 'pow', 'mul', 'add')):
        return 'elementwise'
    return 'other'


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.scaling:
        return run_scaling(args, list(sys.argv[1:] if argv is None else argv))
    from generate import init_distributed, init_logging
    rank, world, local_rank = init_distributed(args)
    init_logging(rank)
    from wan.distributed.cfg_parallel import parallel_layout
    try:
        _, ulysses = parallel_layout(world, args.ulysses_size, args.cfg_parallel)
    except ValueError as exc:
        raise SystemExit(f'{world} process(es) cannot run ulysses_size {args.ulysses_size} '
                         f'(cfg parallel {args.cfg_parallel}): {exc}')
    if args.profile and world > 1:
        raise SystemExit('--profile times one forward on one GPU: run it without torchrun')
    from wan.configs import SIZE_CONFIGS, SUPPORTED_SIZES, WAN_CONFIGS, default_size
    from wan.text2video import WanT2V
    from wan.text2video_optimized import optimize_pipeline
    from wan.utils.memory_plan import tokens_for

    cfg = WAN_CONFIGS[args.task]
    if args.size is None:
        args.size = default_size(args.task)
    if args.size not in SUPPORTED_SIZES[args.task]:
        raise SystemExit(f'unsupported size {args.size} for {args.task}: '
                         f'{SUPPORTED_SIZES[args.task]}')
    args.frame_num = args.frame_num or cfg.frame_num
    args.sample_shift = args.sample_shift or cfg.sample_shift
    args.guide_scale = cfg.sample_guide_scale
    if args.ckpt_dir is None:
        args.random_init = True
    size = SIZE_CONFIGS[args.size]
    tokens = tokens_for(size, args.frame_num, cfg.vae_stride, cfg.patch_size)

    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else \
        torch.device('cpu')
    result = {'schema': 'wan-fast-benchmark/1', 'env': environment(device),
              'parallel': {'world_size': world, 'ulysses_size': ulysses,
                           'cfg_parallel': args.cfg_parallel, 'dit_fsdp': args.dit_fsdp,
                           't5_fsdp': args.t5_fsdp,
                           'backend': torch.distributed.get_backend() if _distributed()
                           else None},
              'settings': {k: v for k, v in vars(args).items()
                           if k not in ('guide_scale', '_result')},
              'task': args.task, 'size': args.size, 'frame_num': args.frame_num,
              'tokens': tokens, 'sample_steps': args.sample_steps,
              'flops_per_forward': forward_flops(cfg, tokens), 'modes': {}}
    timer = Timer(device)

    # one GPU's ceilings (rank 0's); with N GPUs the ideal step is the floor / N
    logging.info('measuring ceilings (bf16 GEMM, attention kernels at L=%d)', tokens)
    result['ceilings'] = measure_ceilings(cfg, tokens, device if rank == 0 else
                                          torch.device('cpu'))
    result['floor_per_forward'] = floor_per_forward(cfg, tokens, result['ceilings'])

    build = []
    with timer(build):
        pipe = WanT2V(cfg, args.ckpt_dir, device_id=local_rank, rank=rank,
                      t5_fsdp=args.t5_fsdp, dit_fsdp=args.dit_fsdp, use_sp=ulysses > 1,
                      convert_model_dtype=args.convert_model_dtype,
                      random_init=args.random_init, random_init_seed=0,
                      cfg_parallel=args.cfg_parallel, ulysses_size=ulysses)
    result['build_seconds'] = build[0]
    boundary = choose_boundary(pipe, args)
    if boundary is not None:
        pipe.boundary = boundary
    result['boundary_used'] = pipe.boundary
    _, ts = pipe.make_scheduler(args.sample_solver, 40, cfg.sample_shift, 'cpu')
    high40 = int((ts >= cfg.boundary * cfg.num_train_timesteps).sum())
    result['projection_split_40'] = {'high': high40, 'low': 40 - high40}

    from wan.modules.attention import resolve_backend
    modes = ['baseline', 'optimized'] if args.mode == 'both' else [args.mode]
    videos = {}
    if 'baseline' in modes:
        for m in (pipe.low_noise_model, pipe.high_noise_model):
            m.options.attn_backend = resolve_backend(args.baseline_attention,
                                                              pipe.device)
        # the reference's offload default: on with one GPU, off under torchrun
        r = run_mode(pipe, args, size, 'baseline', args.seed, offload_model=world == 1,
                     generate_kwargs={})
        r['attention_backend'] = pipe.low_noise_model.options.attn_backend
        videos['baseline'] = {'video': r.pop('video'), 'x0': r.pop('x0')}
        result['modes']['baseline'] = r
        if args.profile and device.type == 'cuda':
            r['profile'] = profile_forward(pipe, pipe.low_noise_model, size, args.frame_num,
                                           'baseline')
        save_partial(result, args)
        if args.same_kernel_baseline and 'optimized' in modes:
            kernel = resolve_backend(args.attention, pipe.device)
            for m in (pipe.low_noise_model, pipe.high_noise_model):
                m.options.attn_backend = kernel
            r2 = run_mode(pipe, args, size, f'baseline+{kernel}', args.seed,
                          offload_model=world == 1, generate_kwargs={})
            r2['attention_backend'] = kernel
            videos['baseline_same_kernel'] = {'video': r2.pop('video'), 'x0': r2.pop('x0')}
            result['modes']['baseline_same_kernel'] = r2
            save_partial(result, args)

    if 'optimized' in modes:
        toggles = {t: getattr(args, t) for t in TOGGLES}
        t0 = time.perf_counter()
        optimize_pipeline(pipe, attention=args.attention, compile_mode=args.compile_mode,
                          **toggles)
        setup = time.perf_counter() - t0
        plan = pipe.plan_for(size, args.frame_num, offload_model=False)
        warm = pipe.warm_up(size, args.frame_num) if device.type == 'cuda' else 0.0
        r = run_mode(pipe, args, size, 'optimized', args.seed, offload_model=False,
                     generate_kwargs={})
        r['setup_seconds'] = setup
        r['warmup_compile_seconds'] = warm
        r['attention_backend'] = pipe.attention_backend
        r['cross_attention_backend'] = pipe.low_noise_model.options.cross_attn_backend
        r['toggles'] = pipe.opt.as_dict()
        r['memory_plan'] = plan.as_dict()
        videos['optimized'] = {'video': r.pop('video'), 'x0': r.pop('x0')}
        result['modes']['optimized'] = r
        save_partial(result, args)
        if args.profile and device.type == 'cuda':
            r['profile'] = profile_forward(pipe, pipe.low_noise_model, size, args.frame_num,
                                           'optimized')
        if args.ablate is not None:
            args._result = result
            result['ablation'] = run_ablation(pipe, args, size, toggles)

    if rank != 0:  # rank 0 decodes, compares and writes
        _end_distributed()
        return result
    if 'baseline' in videos and 'optimized' in videos:
        result['agreement'] = agreement(videos['baseline'], videos['optimized'])
    if 'baseline' in videos and 'baseline_same_kernel' in videos:
        # the reference path against itself with only the attention kernel changed: the
        # rounding-noise level any bf16 change of kernel produces on these weights
        result['agreement_reference_kernel_swap'] = agreement(videos['baseline'],
                                                              videos['baseline_same_kernel'])
    derive(result)

    path = args.output
    if args.save_results and path is None:
        gpu = (result['env']['gpu'] or 'cpu').replace(' ', '_').replace('/', '_')
        stamp = datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')
        path = os.path.join('bench', 'results',
                            f'{gpu}_{args.task}_{args.size.replace("*", "x")}_{args.mode}_'
                            f'{stamp}.json')
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(result, f, indent=2, default=str)
        logging.info('results written to %s', path)
        result['output_path'] = path
    print_table(result)
    _end_distributed()
    return result


def _end_distributed() -> None:
    if _distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def derive(result: dict) -> dict:
    """Numbers computed from the measurements (idempotent; bench/render.py reuses it, also on
    results saved before a run finished): per-forward time, achieved TFLOP/s, 40-step
    projections, speed-ups, ratio to the floor."""
    flops = result['flops_per_forward']['total']
    split = result['projection_split_40']
    for r in result['modes'].values():
        for expert in ('high', 'low'):
            s = r['steps'][expert]
            if s['median_seconds']:
                s['achieved_tflops'] = 2 * flops / s['median_seconds'] / 1e12
                s['seconds_per_forward'] = s['median_seconds'] / 2
        r['projected_40_step_seconds'] = project_40(r, split['high'], split['low'])
        r['projection_note'] = (f"projected from measured stages: T5 + {split['high']} x "
                                f"high-noise step + {split['low']} x low-noise step + switches "
                                f"+ VAE decode")
    modes = result['modes']
    if 'baseline' in modes and 'optimized' in modes:
        result['speedup'] = _speedups(modes['baseline'], modes['optimized'])
        if 'baseline_same_kernel' in modes:
            result['speedup_same_kernel'] = _speedups(modes['baseline_same_kernel'],
                                                      modes['optimized'])
    floor = result.get('floor_per_forward')
    # the ideal step on N GPUs: the two forwards' floor spread evenly over the N GPUs
    world = result.get('parallel', {}).get('world_size', 1)
    if floor and 'optimized' in modes:
        for expert in ('high', 'low'):
            s = modes['optimized']['steps'][expert]
            if s['median_seconds']:
                s['ratio_to_floor'] = s['median_seconds'] / (2 * floor['seconds'] / world)
    return result


# ----------------------------------------------------------------------------- scaling
_LAUNCH_OPTIONS = {'--scaling': '+', '--output': 1, '--ulysses_size': 1, '--save_results': 0,
                   '--cfg_parallel': 0}


def child_argv(argv: list) -> list:
    """The command line without the options the scaling launcher sets per run."""
    out, skip_many, i = [], False, 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split('=', 1)[0]
        if skip_many and not tok.startswith('--'):
            i += 1
            continue
        skip_many = False
        if name in _LAUNCH_OPTIONS:
            n = _LAUNCH_OPTIONS[name]
            if n == '+':
                skip_many = True
            elif n == 1 and '=' not in tok:
                i += 1
            i += 1
            continue
        out.append(tok)
        i += 1
    return out


def parse_scaling_spec(spec: str) -> tuple:
    """'4' -> (4 processes, no CFG parallel); '4c' -> (4, CFG parallel, Ulysses 2)."""
    cfg = spec.endswith('c')
    try:
        n = int(spec[:-1] if cfg else spec)
    except ValueError:
        raise SystemExit(f"--scaling entries are GPU counts like 4 or 4c, got {spec!r}")
    if n < 1 or (cfg and n % 2):
        raise SystemExit(f'--scaling {spec}: needs N >= 1 (and even with c)')
    return n, cfg


def run_scaling(args, argv: list) -> dict:
    """One torchrun per --scaling entry, in turn; their results and the scaling in one JSON."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    import tempfile
    specs = [parse_scaling_spec(x) for x in args.scaling]
    path = args.output or os.path.join(
        'bench', 'results', f'scaling_{args.task}_{(args.size or "default").replace("*", "x")}_'
        f'{datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")}.json')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    base = child_argv(argv)
    tmp = tempfile.mkdtemp(prefix='wan_scaling_')
    combined = {'schema': 'wan-fast-benchmark-scaling/1',
                'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
                'git_commit': git_commit(),
                'date_utc': datetime.now(timezone.utc).isoformat(timespec='seconds'),
                'runs': []}
    for n, cfg in specs:
        ulysses = n // 2 if cfg else n
        out = os.path.join(tmp, f'n{n}{"c" if cfg else ""}.json')
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               f'--nproc_per_node={n}', os.path.abspath(__file__), *base,
               '--ulysses_size', str(ulysses), '--output', out] + \
            (['--cfg_parallel'] if cfg else [])
        logging.info('scaling run: %d process(es), ulysses %d, cfg parallel %s', n, ulysses, cfg)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        entry = {'nproc': n, 'ulysses_size': ulysses, 'cfg_parallel': cfg, 'returncode': rc,
                 'wall_seconds': time.perf_counter() - t0}
        for candidate, partial in ((out, False), (out + '.partial', True)):
            if os.path.exists(candidate):
                with open(candidate) as f:
                    entry['result'] = derive(json.load(f))
                entry['partial'] = partial
                break
        if rc != 0:
            logging.warning('scaling run with %d process(es) failed (exit %d)', n, rc)
        combined['runs'].append(entry)
        derive_scaling(combined)
        with open(path, 'w') as f:  # after every run: a later failure loses nothing
            json.dump(combined, f, indent=2, default=str)
    combined['output_path'] = path
    logging.info('results written to %s', path)
    print_scaling(combined)
    return combined


def derive_scaling(combined: dict, one_gpu_step_seconds: Optional[float] = None) -> dict:
    """Per-step time at N GPUs against 1 GPU (same mode, same size), efficiency, projections.

    A run's step time is the 40-step mix of its expert medians (26 high-noise, 14 low-noise
    steps for t2v-A14B), so both experts count as they do in a real generation. The one-GPU
    step is this file's 1-process run, or `one_gpu_step_seconds` (from another file on the
    same machine) when it has none.
    """
    rows = []
    for run in combined['runs']:
        res = run.get('result')
        if not res or not res.get('modes'):
            rows.append({'nproc': run['nproc'], 'cfg_parallel': run['cfg_parallel'],
                         'error': f"exit {run['returncode']}, no result"})
            continue
        mode = 'optimized' if 'optimized' in res['modes'] else next(iter(res['modes']))
        m = res['modes'][mode]
        split = res['projection_split_40']
        hi, lo = m['steps']['high']['median_seconds'], m['steps']['low']['median_seconds']
        step = (split['high'] * hi + split['low'] * lo) / 40 if hi and lo else None
        rows.append({'nproc': run['nproc'], 'ulysses_size': run['ulysses_size'],
                     'cfg_parallel': run['cfg_parallel'], 'mode': mode,
                     'step_high_seconds': hi, 'step_low_seconds': lo, 'step_seconds': step,
                     'projected_40_step_seconds': m.get('projected_40_step_seconds'),
                     'peak_gpu_gib_per_rank': m.get('peak_gpu_gib_per_rank'),
                     'ratio_to_floor_high': m['steps']['high'].get('ratio_to_floor'),
                     'gpu': res['env'].get('gpu'), 'torch': res['env'].get('torch'),
                     'size': res['size'], 'frame_num': res['frame_num'],
                     'sample_steps': res['sample_steps'], 'partial': run.get('partial')})
    one = next((r['step_seconds'] for r in rows
                if r.get('nproc') == 1 and r.get('step_seconds')), one_gpu_step_seconds)
    for r in rows:
        if one and r.get('step_seconds'):
            r['speedup_vs_1'] = one / r['step_seconds']
            r['scaling_efficiency'] = r['speedup_vs_1'] / r['nproc']
    combined['scaling'] = rows
    return combined


def print_scaling(combined: dict) -> None:
    lines = [f"{'GPUs':<6}{'layout':<16}{'step hi':>9}{'step lo':>9}{'step':>8}{'speedup':>9}"
             f"{'eff':>7}{'proj40':>8}{'peak/GPU':>10}"]
    for r in combined['scaling']:
        if 'error' in r:
            lines.append(f"{r['nproc']:<6}{r['error']}")
            continue
        layout = f"U{r['ulysses_size']}" + (' x CFG2' if r['cfg_parallel'] else '')
        peaks = [p for p in (r['peak_gpu_gib_per_rank'] or []) if p is not None]
        lines.append(f"{r['nproc']:<6}{layout:<16}{_fmt(r['step_high_seconds']):>9}"
                     f"{_fmt(r['step_low_seconds']):>9}{_fmt(r['step_seconds']):>8}"
                     f"{_fmt(r.get('speedup_vs_1'), 'x'):>9}"
                     f"{_fmt(r.get('scaling_efficiency'), '', 2):>7}"
                     f"{_fmt(r['projected_40_step_seconds'], '', 0):>8}"
                     f"{_fmt(max(peaks) if peaks else None, '', 1):>10}")
    print('\n'.join(lines))


def save_partial(result: dict, args) -> None:
    """Write what is measured so far next to --output, so a late failure loses nothing."""
    if args.output and _rank() == 0:
        with open(args.output + '.partial', 'w') as f:
            json.dump(result, f, indent=2, default=str)


def _speedups(b: dict, o: dict) -> dict:
    out = {}
    for expert in ('high', 'low'):
        bs, os_ = b['steps'][expert]['median_seconds'], o['steps'][expert]['median_seconds']
        out[f'step_{expert}'] = bs / os_ if bs and os_ else None
    pb, po = b.get('projected_40_step_seconds'), o.get('projected_40_step_seconds')
    out['projected_40_step'] = pb / po if pb and po else None
    # the VAE alone where recorded (older results: the whole decode stage)
    db, do = (m.get('vae_decode_seconds') or m['decode_seconds'] for m in (b, o))
    out['vae_decode'] = statistics.median(db) / statistics.median(do) if db and do else None
    return out


def run_ablation(pipe, args, size, toggles: dict) -> dict:
    """Each listed toggle off in turn (others as given), DiT step time only."""
    from wan.text2video_optimized import OptimizationConfig
    names = args.ablate or [t for t, on in toggles.items() if on and not t.startswith('vae_')]
    steps = args.ablate_steps
    saved = (args.sample_steps, args.num_runs)
    args.sample_steps, args.num_runs = steps, 1
    out = {}
    try:
        for name in ['none'] + names:
            t = dict(toggles)
            if name != 'none':
                t[name] = False
            pipe._setup_optimizations(OptimizationConfig(attention=args.attention,
                                                         compile_mode=args.compile_mode, **t))
            boundary = choose_boundary(pipe, args)
            if boundary is not None:
                pipe.boundary = boundary
            try:
                if pipe.device.type == 'cuda':
                    torch.cuda.empty_cache()
                warm = pipe.warm_up(size, args.frame_num) if pipe.device.type == 'cuda' else 0.0
                r = run_mode(pipe, args, size, f'ablate:{name}-off', args.seed,
                             offload_model=False, generate_kwargs={})
            except torch.cuda.OutOfMemoryError as exc:
                # a configuration that does not fit is a result too: record it, go on
                logging.warning('[ablate:%s-off] out of GPU memory: %s', name, str(exc)[:200])
                uninstrument(pipe)
                torch.cuda.empty_cache()
                out[name] = {'error': 'out of GPU memory', 'toggles': t}
                continue
            r.pop('video')
            r.pop('x0')
            out[name] = {'steps': r['steps'], 'peak_gpu_gib': r['peak_gpu_gib'],
                         'warmup_compile_seconds': warm, 'toggles': t}
            result_partial = getattr(args, '_result', None)
            if result_partial is not None:
                result_partial['ablation'] = out
                save_partial(result_partial, args)
    finally:
        args.sample_steps, args.num_runs = saved
    return out


def _fmt(x, unit='', nd=2):
    return '-' if x is None else f'{x:.{nd}f}{unit}'


def print_table(result: dict) -> None:
    env = result['env']
    par = result.get('parallel') or {'world_size': 1}
    lines = [f"GPU {env['gpu'] or 'cpu'} | torch {env['torch']} | {result['task']} "
             f"{result['size']} x {result['frame_num']} frames | L={result['tokens']} | "
             f"{result['sample_steps']} steps | {par['world_size']} process(es)"
             + (f", ulysses {par['ulysses_size']}, cfg parallel {par['cfg_parallel']}"
                if par['world_size'] > 1 else '')]
    floor = result.get('floor_per_forward')
    if floor:
        lines.append(f"floor per forward {floor['seconds']:.2f} s (attention "
                     f"{floor['attention_seconds']:.2f} s with {floor['attention_kernel']}, GEMM "
                     f"{floor['gemm_seconds']:.2f} s); GEMM "
                     f"{result['ceilings']['gemm_bf16_tflops']:.0f} TFLOP/s")
    lines.append(f"{'mode':<22}{'kernel':<12}{'step hi':>9}{'step lo':>9}{'T5':>7}"
                 f"{'switch':>8}{'VAE':>7}{'e2e':>8}{'proj40':>8}{'peakGiB':>9}")
    for name, r in result['modes'].items():
        s = r['steps']
        lines.append(f"{name:<22}{str(r.get('attention_backend')):<12}"
                     f"{_fmt(s['high']['median_seconds']):>9}{_fmt(s['low']['median_seconds']):>9}"
                     f"{_fmt(statistics.median(r['t5_seconds']) if r['t5_seconds'] else None):>7}"
                     f"{_fmt(sum(r['switch_seconds'])):>8}"
                     f"{_fmt(statistics.median(r['decode_seconds']) if r['decode_seconds'] else None):>7}"
                     f"{_fmt(statistics.median(r['end_to_end_seconds'])):>8}"
                     f"{_fmt(r.get('projected_40_step_seconds'), '', 0):>8}"
                     f"{_fmt(r['peak_gpu_gib'], '', 1):>9}")
    if 'speedup' in result:
        sp = result['speedup']
        lines.append(f"speed-up per step: high {_fmt(sp['step_high'], 'x')} low "
                     f"{_fmt(sp['step_low'], 'x')}; projected 40-step "
                     f"{_fmt(sp['projected_40_step'], 'x')}; VAE {_fmt(sp['vae_decode'], 'x')}")
    if 'speedup_same_kernel' in result:
        sp = result['speedup_same_kernel']
        lines.append(f"speed-up vs reference with the same kernel: high "
                     f"{_fmt(sp['step_high'], 'x')} low {_fmt(sp['step_low'], 'x')}")
    for key, label in (('agreement', 'baseline vs optimized'),
                       ('agreement_reference_kernel_swap', 'baseline vs baseline+kernel')):
        if key in result:
            a = result[key]
            lines.append(f"agreement {label}: PSNR {_fmt(a['psnr_db'], ' dB')}, max abs diff "
                         f"{_fmt(a['max_abs_diff'], '', 4)}, latent rel err "
                         f"{_fmt(a['latent_rel_err'], '', 5)}")
    opt = result['modes'].get('optimized')
    if opt and opt['steps']['high'].get('ratio_to_floor'):
        lines.append(f"optimized step / floor: high {opt['steps']['high']['ratio_to_floor']:.3f}"
                     f" low {_fmt(opt['steps']['low'].get('ratio_to_floor'), '', 3)}")
    for name, r in (result.get('ablation') or {}).items():
        if 'error' in r:
            lines.append(f"ablation {name + ' off':<26} {r['error']}")
            continue
        s = r['steps']
        lines.append(f"ablation {name + ' off':<26} step hi {_fmt(s['high']['median_seconds'])}"
                     f" lo {_fmt(s['low']['median_seconds'])} peak {_fmt(r['peak_gpu_gib'], '', 1)}")
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
