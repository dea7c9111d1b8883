"""One benchmark process: build the pipeline once, time each mode, compare their outputs.

Both modes run in one process on the same weights (the optimized mode upgrades the very same
pipeline with `optimize_pipeline`), the same seed and the same prompt, so that speed-up ratios
and output agreement come from one run on one GPU. Under torchrun every rank runs the same
pipeline; rank 0 decodes, compares and writes the JSON, with the peak memory of every rank.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

import torch

from wan.optimizations import OptimizationConfig, config_from_args, toggle_names
from wan.utils.timing import Timer

from .ceilings import floor_per_forward, forward_flops, measure_ceilings
from .checks import RequestError
from .instrument import StageRecorder
from .schema import (SCHEMA, BenchmarkResult, ModeResult, agreement, derive, median,
                     partial_path, summarize_steps, write_final, write_json_atomic)

__all__ = ['toggle_names', 'run_benchmark', 'run_mode', 'profile_forward', 'environment',
           'git_commit', 'choose_boundary', 'result_path', 'print_table', 'fmt']

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, 'bench', 'results')


# ----------------------------------------------------------------------------- ranks
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def all_ranks(value: Any) -> list:
    """`value` from every rank, in rank order ([value] without a process group)."""
    if not _distributed():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _end_distributed() -> None:
    if _distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- metadata
def git_commit() -> Optional[str]:
    # GIT_COMMIT first: a copied working tree can carry a stale .git whose HEAD is not the
    # code that runs
    if os.environ.get('GIT_COMMIT'):
        return os.environ['GIT_COMMIT']
    try:
        return subprocess.check_output(['git', 'rev-parse', 'HEAD'], text=True,
                                       stderr=subprocess.DEVNULL, cwd=ROOT).strip()
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    from wan.modules.attention import available_backends
    env = {'torch': torch.__version__, 'cuda': torch.version.cuda,
           'python': platform.python_version(), 'platform': platform.platform(),
           'device': str(device), 'gpu': None, 'attention_backends': available_backends(),
           'git_commit': git_commit(),
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


def result_path(args: argparse.Namespace, kind: str, gpu: Optional[str]) -> Optional[str]:
    """--output, else a name under bench/results/ with --save_results, else None."""
    if args.output or not args.save_results:
        return args.output
    gpu = (gpu or 'cpu').replace(' ', '_').replace('/', '_')
    stamp = datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')
    size = (args.size or 'default').replace('*', 'x')
    return os.path.join(RESULTS_DIR, f'{gpu}_{args.task}_{size}_{kind}_{stamp}.json')


def random_lora(cfg, rank: int, seed: int = 0) -> str:
    """A random LoRA file (lora_down/lora_up + alpha, bf16) on every block linear of the
    task's experts, in a temporary folder; its path. For timing: its values mean nothing."""
    import tempfile

    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    shapes = {'self_attn.q': (cfg.dim, cfg.dim), 'self_attn.k': (cfg.dim, cfg.dim),
              'self_attn.v': (cfg.dim, cfg.dim), 'self_attn.o': (cfg.dim, cfg.dim),
              'cross_attn.q': (cfg.dim, cfg.dim), 'cross_attn.k': (cfg.dim, cfg.dim),
              'cross_attn.v': (cfg.dim, cfg.dim), 'cross_attn.o': (cfg.dim, cfg.dim),
              'ffn.0': (cfg.ffn_dim, cfg.dim), 'ffn.2': (cfg.dim, cfg.ffn_dim)}
    sd = {}
    for i in range(cfg.num_layers):
        for name, (out_f, in_f) in shapes.items():
            key = f'diffusion_model.blocks.{i}.{name}'
            sd[f'{key}.lora_down.weight'] = (torch.randn(rank, in_f, generator=gen) /
                                             in_f ** 0.5).bfloat16()
            sd[f'{key}.lora_up.weight'] = (torch.randn(out_f, rank, generator=gen) *
                                           1e-3).bfloat16()
            sd[f'{key}.alpha'] = torch.tensor(float(rank))
    path = os.path.join(tempfile.mkdtemp(prefix='wan_lora_'), f'random_rank{rank}.safetensors')
    save_file(sd, path)
    logging.info('random rank-%d LoRA for the benchmark: %s', rank, path)
    return path


def choose_boundary(pipe, args: argparse.Namespace) -> Optional[float]:
    """The boundary for this run: None keeps the config's; 'auto' splits the steps evenly."""
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


# ----------------------------------------------------------------------------- one mode
def run_mode(pipe, args: argparse.Namespace, size: Tuple[int, int], label: str,
             offload_model: bool) -> Tuple[ModeResult, Dict[str, Optional[torch.Tensor]]]:
    """`--num_runs` timed generate() calls; the mode's measurements and its last output
    ({'video', 'x0'}: decoded video and final latent, on rank 0)."""
    device = pipe.device
    rec = pipe.add_observer(StageRecorder(device))
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    logging.info('[%s] generate: %s, %d frames, %d steps', label, args.size, args.frame_num,
                 args.sample_steps)
    e2e: List[float] = []
    video = None
    try:
        for run in range(args.num_runs):
            steps_before = len(rec.seconds['step'])
            with rec.timer(e2e):
                video = pipe.generate(args.prompt, size=size, frame_num=args.frame_num,
                                      shift=args.sample_shift, sample_solver=args.sample_solver,
                                      sampling_steps=args.sample_steps,
                                      guide_scale=args.guide_scale, seed=args.seed,
                                      offload_model=offload_model)
            logging.info('[%s] run %d: %.2f s (%d steps)', label, run, e2e[-1],
                         len(rec.seconds['step']) - steps_before)
    finally:
        pipe.remove_observer(rec)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    # every rank's peak (one process per GPU); the headline is the largest
    peaks = all_ranks(peak)
    s = rec.seconds
    mode: ModeResult = {
        'label': label, 'end_to_end_seconds': e2e, 't5_seconds': s['text_encode'],
        'switch_seconds': s['expert_switch'], 'decode_seconds': s['decode'],
        'vae_decode_seconds': s['vae_decode'],
        'steps': summarize_steps(s['step'], rec.step_experts, args.warmup),
        'peak_gpu_gib': None if peak is None else max(peaks), 'peak_gpu_gib_per_rank': peaks}
    return mode, {'video': video, 'x0': rec.x0}


# ----------------------------------------------------------------------------- profile
def profile_forward(pipe, model, size: Tuple[int, int], frame_num: int,
                    label: str) -> Dict[str, Any]:
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


def _profile_forward(pipe, model, size, frame_num, label) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile
    shape = pipe.target_shape(size, frame_num)
    seq_len = pipe.seq_len_for(shape)
    lat = torch.randn(*shape, device=pipe.device)
    ctx = torch.randn(20, pipe.config.get('text_dim', 4096), device=pipe.device,
                      dtype=torch.bfloat16)
    t = torch.tensor([900], device=pipe.device)
    with torch.autocast('cuda', dtype=pipe.param_dtype), torch.no_grad():
        model([lat], t=t, context=[ctx], seq_len=seq_len)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model([lat], t=t, context=[ctx], seq_len=seq_len)
            torch.cuda.synchronize()
    groups: Dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, 'device_time_total', None) or getattr(evt, 'cuda_time_total', 0)
        if not us or evt.key.startswith(('ProfilerStep', 'aten::', 'cuda', 'wan::')):
            continue
        family = kernel_family(evt.key)
        groups[family] = groups.get(family, 0.0) + us / 1e6
        kernels.append((us / 1e6, evt.count, evt.key[:160]))
    total = sum(groups.values())
    kernels.sort(reverse=True)
    logging.info('[%s] profile: %s', label, {k: round(v, 3) for k, v in groups.items()})
    return {'seconds_by_family': groups, 'total_seconds': total,
            'top_kernels': [{'seconds': t, 'calls': c, 'name': n} for t, c, n in kernels[:25]]}


def kernel_family(name: str) -> str:
    """The family a CUDA kernel's name belongs to (attention, gemm, fused_triton, ...)."""
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


# ----------------------------------------------------------------------------- the run
def run_benchmark(args: argparse.Namespace) -> BenchmarkResult:
    """One benchmark process (args checked and completed by bench.cli.complete_args)."""
    from generate import init_distributed, init_logging
    rank, world, local_rank = init_distributed(args)
    init_logging(rank)
    from wan.distributed.cfg_parallel import parallel_layout
    try:
        _, ulysses = parallel_layout(world, args.ulysses_size, args.cfg_parallel)
    except ValueError as exc:
        raise RequestError(f'{world} process(es) cannot run ulysses_size {args.ulysses_size} '
                           f'(cfg parallel {args.cfg_parallel}): {exc}')
    if args.profile and world > 1:
        raise RequestError('--profile times one forward on one GPU: run it without torchrun')
    from wan.configs import SIZE_CONFIGS, WAN_CONFIGS
    from wan.utils.memory_plan import tokens_for

    cfg = WAN_CONFIGS[args.task]
    size = SIZE_CONFIGS[args.size]
    tokens = tokens_for(size, args.frame_num, cfg.vae_stride, cfg.patch_size)
    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else \
        torch.device('cpu')
    env = environment(device)
    path = result_path(args, args.mode, env['gpu']) if rank == 0 else None
    result: BenchmarkResult = {
        'schema': SCHEMA, 'env': env,
        'parallel': {'world_size': world, 'ulysses_size': ulysses,
                     'cfg_parallel': args.cfg_parallel, 'dit_fsdp': args.dit_fsdp,
                     't5_fsdp': args.t5_fsdp,
                     'backend': torch.distributed.get_backend() if _distributed() else None},
        'settings': {k: v for k, v in vars(args).items() if k != 'guide_scale'},
        'task': args.task, 'size': args.size, 'frame_num': args.frame_num,
        'tokens': tokens, 'sample_steps': args.sample_steps,
        'flops_per_forward': forward_flops(cfg, tokens), 'modes': {}}
    try:
        _measure(result, args, cfg, size, tokens, device, rank, world, local_rank, ulysses,
                 path)
    except BaseException as exc:
        # what was measured stays in the partial file, with the reason the run stopped
        result['error'] = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'
        _save_partial(result, path)
        raise
    if rank != 0:  # rank 0 decodes, compares and writes
        _end_distributed()
        return result
    if path:
        write_final(path, result)
        logging.info('results written to %s', path)
        result['output_path'] = path
    print_table(result)
    _end_distributed()
    return result


def _save_partial(result: BenchmarkResult, path: Optional[str]) -> None:
    """What is measured so far, next to the output path (a late failure loses nothing)."""
    if path:
        write_json_atomic(partial_path(path), result)


def _measure(result, args, cfg, size, tokens, device, rank, world, local_rank, ulysses,
             path) -> None:
    from wan.modules.attention import resolve_backend
    from wan.text2video import WanT2V
    from wan.text2video_optimized import WanT2VOptimized, optimize_pipeline
    timer = Timer(device)

    # one GPU's ceilings (rank 0's); with N GPUs the ideal step is the floor / N
    logging.info('measuring ceilings (bf16 GEMM, attention kernels at L=%d)', tokens)
    result['ceilings'] = measure_ceilings(cfg, tokens, device if rank == 0 else
                                          torch.device('cpu'))
    result['floor_per_forward'] = floor_per_forward(cfg, tokens, result['ceilings'])

    build: List[float] = []
    common = dict(device_id=local_rank, rank=rank, t5_fsdp=args.t5_fsdp,
                  dit_fsdp=args.dit_fsdp, use_sp=ulysses > 1,
                  convert_model_dtype=args.convert_model_dtype, random_init=args.random_init,
                  random_init_seed=0, cfg_parallel=args.cfg_parallel, ulysses_size=ulysses,
                  loras=[random_lora(cfg, args.lora_rank)] if args.lora_rank else [])
    toggles = config_from_args(args).as_dict()
    with timer(build):
        if args.mode == 'optimized':
            # built optimized: the experts load in their dtype policy straight to where the
            # memory plan (under --gpu_memory_gib) puts them
            pipe = WanT2VOptimized(cfg, args.ckpt_dir, **common,
                                   optimizations=OptimizationConfig(**toggles),
                                   gpu_memory_gib=args.gpu_memory_gib,
                                   plan_size=(size, args.frame_num))
        else:
            pipe = WanT2V(cfg, args.ckpt_dir, **common)
    result['build_seconds'] = build[0]
    boundary = choose_boundary(pipe, args)
    if boundary is not None:
        pipe.boundary = boundary
    result['boundary_used'] = pipe.boundary
    _, ts = pipe.make_scheduler(args.sample_solver, 40, cfg.sample_shift, 'cpu')
    high40 = int((ts >= cfg.boundary * cfg.num_train_timesteps).sum())
    result['projection_split_40'] = {'high': high40, 'low': 40 - high40}

    modes = ['baseline', 'optimized'] if args.mode == 'both' else [args.mode]
    outputs: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}

    def record(name: str, mode: ModeResult, out) -> None:
        outputs[name] = out
        result['modes'][name] = mode
        _save_partial(result, path)

    if 'baseline' in modes:
        for m in (pipe.low_noise_model, pipe.high_noise_model):
            m.options.attn_backend = resolve_backend(args.baseline_attention, pipe.device)
        # the reference's offload default: on with one GPU, off under torchrun
        r, out = run_mode(pipe, args, size, 'baseline', offload_model=world == 1)
        r['attention_backend'] = pipe.low_noise_model.options.attn_backend
        if args.profile and device.type == 'cuda':
            r['profile'] = profile_forward(pipe, pipe.low_noise_model, size, args.frame_num,
                                           'baseline')
        record('baseline', r, out)
        if args.same_kernel_baseline and 'optimized' in modes:
            kernel = resolve_backend(args.attention, pipe.device)
            for m in (pipe.low_noise_model, pipe.high_noise_model):
                m.options.attn_backend = kernel
            r2, out = run_mode(pipe, args, size, f'baseline+{kernel}', offload_model=world == 1)
            r2['attention_backend'] = kernel
            record('baseline_same_kernel', r2, out)

    if 'optimized' in modes:
        t0 = time.perf_counter()
        if not isinstance(pipe, WanT2VOptimized):  # --mode both: the same models, optimized
            pipe = optimize_pipeline(pipe, **toggles)
        setup = time.perf_counter() - t0
        plan = pipe.plan_for(size, args.frame_num, offload_model=False)
        warm = pipe.warm_up(size, args.frame_num) if device.type == 'cuda' else 0.0
        r, out = run_mode(pipe, args, size, 'optimized', offload_model=False)
        r.update(setup_seconds=setup, warmup_compile_seconds=warm,
                 attention_backend=pipe.attention_backend,
                 cross_attention_backend=pipe.low_noise_model.options.cross_attn_backend,
                 toggles=pipe.opt.as_dict(), memory_plan=plan.as_dict())
        if args.profile and device.type == 'cuda':
            r['profile'] = profile_forward(pipe, pipe.low_noise_model, size, args.frame_num,
                                           'optimized')
        record('optimized', r, out)

    if rank != 0:
        return
    if 'baseline' in outputs and 'optimized' in outputs:
        result['agreement'] = agreement(outputs['baseline'], outputs['optimized'])
    if 'baseline' in outputs and 'baseline_same_kernel' in outputs:
        # the reference path against itself with only the attention kernel changed: the
        # rounding-noise level any bf16 change of kernel produces on these weights
        result['agreement_reference_kernel_swap'] = agreement(outputs['baseline'],
                                                              outputs['baseline_same_kernel'])
    derive(result)


# ----------------------------------------------------------------------------- console
def fmt(x: Optional[float], unit: str = '', nd: int = 2) -> str:
    return '-' if x is None else f'{x:.{nd}f}{unit}'


def print_table(result: BenchmarkResult) -> None:
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
                     f"{fmt(s['high']['median_seconds']):>9}{fmt(s['low']['median_seconds']):>9}"
                     f"{fmt(median(r['t5_seconds'])):>7}{fmt(sum(r['switch_seconds'])):>8}"
                     f"{fmt(median(r['decode_seconds'])):>7}"
                     f"{fmt(median(r['end_to_end_seconds'])):>8}"
                     f"{fmt(r.get('projected_40_step_seconds'), '', 0):>8}"
                     f"{fmt(r['peak_gpu_gib'], '', 1):>9}")
    if 'speedup' in result:
        sp = result['speedup']
        lines.append(f"speed-up per step: high {fmt(sp['step_high'], 'x')} low "
                     f"{fmt(sp['step_low'], 'x')}; projected 40-step "
                     f"{fmt(sp['projected_40_step'], 'x')}; VAE {fmt(sp['vae_decode'], 'x')}")
    if 'speedup_same_kernel' in result:
        sp = result['speedup_same_kernel']
        lines.append(f"speed-up vs reference with the same kernel: high "
                     f"{fmt(sp['step_high'], 'x')} low {fmt(sp['step_low'], 'x')}")
    for key, label in (('agreement', 'baseline vs optimized'),
                       ('agreement_reference_kernel_swap', 'baseline vs baseline+kernel')):
        if key in result:
            a = result[key]
            lines.append(f"agreement {label}: PSNR {fmt(a['psnr_db'], ' dB')}, max abs diff "
                         f"{fmt(a['max_abs_diff'], '', 4)}, latent rel err "
                         f"{fmt(a['latent_rel_err'], '', 5)}")
    opt = result['modes'].get('optimized')
    if opt and opt['steps']['high'].get('ratio_to_floor'):
        lines.append(f"optimized step / floor: high {opt['steps']['high']['ratio_to_floor']:.3f}"
                     f" low {fmt(opt['steps']['low'].get('ratio_to_floor'), '', 3)}")
    for name, r in (result.get('ablation') or {}).items():
        what = 'as configured' if name == 'none' else \
            f"{name} {'on' if r.get('flipped_to') else 'off'}"
        if 'error' in r:
            lines.append(f"ablation {what:<26} {r['error']}")
            continue
        s = r['steps']
        lines.append(f"ablation {what:<26} step hi "
                     f"{fmt(s['high']['median_seconds'])} lo {fmt(s['low']['median_seconds'])}"
                     f" peak {fmt(r['peak_gpu_gib'], '', 1)}")
    print('\n'.join(lines))
