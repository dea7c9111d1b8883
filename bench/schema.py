"""The benchmark's results JSON, typed, and the numbers derived from its measurements.

Two schemas, both read back by `bench/render.py` from every file under bench/results/:

- `wan-fast-benchmark/1` (`BenchmarkResult`): one benchmark process: the machine (`env`), the
  request, the ceilings and floor, and per mode (`baseline`, `baseline_same_kernel`,
  `optimized`) the measured stages; optionally a per-toggle `ablation`;
- `wan-fast-benchmark-scaling/1` (`ScalingResult`): one torchrun per GPU count, each run's
  `BenchmarkResult`, and the `scaling` rows derived from them.

Fields were only ever added, so every key below except the measured basics is optional
(`total=False`): files written by earlier commits lack e.g. `vae_decode_seconds` or
`parallel`. `derive` and `derive_scaling` recompute every derived number from the measured
ones (idempotent), so a reader never trusts a derived number stored by older code.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from typing import Any, Dict, List, Optional, Sequence, TypedDict

import torch

SCHEMA = 'wan-fast-benchmark/1'
SCALING_SCHEMA = 'wan-fast-benchmark-scaling/1'
# the length of a real generation, which the projections extrapolate to
PROJECTION_STEPS = 40
EXPERTS = ('high', 'low')


class StepStats(TypedDict, total=False):
    all_seconds: List[float]            # every step of this expert, in order
    median_seconds: Optional[float]     # over the steps after --warmup
    first_step_overhead_seconds: Optional[float]
    timed_steps: int
    # derived
    achieved_tflops: float
    seconds_per_forward: float          # a step is two forwards (CFG)
    ratio_to_floor: float               # step / (2 x floor per forward / GPUs)


class ModeResult(TypedDict, total=False):
    label: str
    end_to_end_seconds: List[float]     # one per --num_runs
    t5_seconds: List[float]
    switch_seconds: List[float]         # one per step (expert choice and swaps)
    decode_seconds: List[float]         # the decode stage (may move experts first)
    vae_decode_seconds: List[float]     # the VAE alone, inside the decode stage
    steps: Dict[str, StepStats]         # 'high', 'low'
    peak_gpu_gib: Optional[float]       # the largest over the ranks
    peak_gpu_gib_per_rank: List[Optional[float]]
    attention_backend: str
    cross_attention_backend: str
    setup_seconds: float
    warmup_compile_seconds: float
    toggles: Dict[str, Any]             # OptimizationConfig.as_dict() of the run
    memory_plan: Dict[str, Any]
    profile: Dict[str, Any]
    # derived
    projected_40_step_seconds: Optional[float]
    projection_note: str


class Agreement(TypedDict, total=False):
    psnr_db: float
    max_abs_diff: float
    mean_abs_diff: float
    video_shape: List[int]
    video_std_reference: float
    latent_rel_err: Optional[float]


class Floor(TypedDict):
    attention_kernel: str
    attention_seconds: float
    gemm_seconds: float
    seconds: float


class Ceilings(TypedDict):
    gemm_bf16_tflops: Optional[float]
    attention: Dict[str, Dict[str, Any]]   # kernel -> {'seconds', 'tflops'} or {'error'}


class AblationEntry(TypedDict, total=False):
    toggles: Dict[str, Any]             # the configuration that ran
    steps: Dict[str, StepStats]
    peak_gpu_gib: Optional[float]
    warmup_compile_seconds: float
    error: str                          # e.g. 'out of GPU memory': no measurement
    # fresh-process ablations (later files)
    flipped_to: bool                    # the toggle's value in this run (False: "off")
    returncode: int
    command: str
    t5_seconds: List[float]
    switch_seconds: List[float]
    vae_decode_seconds: List[float]
    end_to_end_seconds: List[float]


class BenchmarkResult(TypedDict, total=False):
    schema: str
    env: Dict[str, Any]
    parallel: Dict[str, Any]
    settings: Dict[str, Any]            # the parsed command line
    task: str
    size: str
    frame_num: int
    tokens: int
    sample_steps: int
    flops_per_forward: Dict[str, float]
    ceilings: Ceilings
    floor_per_forward: Optional[Floor]
    build_seconds: float
    boundary_used: float
    projection_split_40: Dict[str, int]  # {'high': 26, 'low': 14} for t2v-A14B
    modes: Dict[str, ModeResult]
    agreement: Agreement
    agreement_reference_kernel_swap: Agreement
    ablation: Dict[str, AblationEntry]  # 'none' = the run's own configuration
    ablation_settings: Dict[str, Any]
    error: str                          # a run that failed part way (a .partial file)
    # derived
    speedup: Dict[str, Optional[float]]
    speedup_same_kernel: Dict[str, Optional[float]]


class ScalingRun(TypedDict, total=False):
    nproc: int
    ulysses_size: int
    cfg_parallel: bool
    returncode: int
    wall_seconds: float
    result: BenchmarkResult
    partial: bool                       # the result came from the run's .partial file
    command: str


class ScalingResult(TypedDict, total=False):
    schema: str
    command: str
    git_commit: Optional[str]
    date_utc: str
    runs: List[ScalingRun]
    scaling: List[Dict[str, Any]]       # derived: one row per run


# ----------------------------------------------------------------------------- measures
def median(xs: Optional[Sequence[float]]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def summarize_steps(step_seconds: Sequence[float], step_experts: Sequence[str],
                    warmup: int) -> Dict[str, StepStats]:
    """Per expert: every step time and the median over the steps after `warmup`."""
    res: Dict[str, StepStats] = {}
    for expert in EXPERTS:
        times = [t for t, e in zip(step_seconds, step_experts) if e == expert]
        timed = times[warmup:] if len(times) > warmup else times[-1:]
        res[expert] = {
            'all_seconds': times,
            'median_seconds': statistics.median(timed) if timed else None,
            'first_step_overhead_seconds':
                (times[0] - statistics.median(timed)) if times and timed else None,
            'timed_steps': len(timed) if times else 0,
        }
    return res


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two videos in [-1, 1] (inf when identical)."""
    a = (a.float().clamp(-1, 1) + 1) / 2
    b = (b.float().clamp(-1, 1) + 1) / 2
    mse = torch.mean((a - b) ** 2).item()
    return float('inf') if mse == 0 else 10 * math.log10(1.0 / mse)


def agreement(ref: Dict[str, Optional[torch.Tensor]],
              other: Dict[str, Optional[torch.Tensor]]) -> Agreement:
    """Decoded-video PSNR / abs diffs and final-latent relative error of two runs, each given
    as {'video': (3, F, H, W), 'x0': final latent or None}."""
    vb, vo = ref['video'].float(), other['video'].float()
    xb, xo = ref['x0'], other['x0']
    return {'psnr_db': psnr(vb, vo), 'max_abs_diff': (vb - vo).abs().max().item(),
            'mean_abs_diff': (vb - vo).abs().mean().item(), 'video_shape': list(vb.shape),
            'video_std_reference': vb.std().item(),
            'latent_rel_err': ((xb - xo).norm() / xb.norm()).item()
            if xb is not None and xo is not None else None}


# ----------------------------------------------------------------------------- derived
def project_40(mode: ModeResult, steps_high: int, steps_low: int) -> Optional[float]:
    """A real generation's time from the measured stages: T5 + steps + switches + decode."""
    s = mode['steps']
    if s['high']['median_seconds'] is None or s['low']['median_seconds'] is None:
        return None
    t5 = median(mode['t5_seconds']) or 0.0
    dec = median(mode['decode_seconds']) or 0.0
    switch = sum(mode['switch_seconds']) / max(1, len(mode['end_to_end_seconds']))
    return t5 + steps_high * s['high']['median_seconds'] + \
        steps_low * s['low']['median_seconds'] + switch + dec


def speedups(b: ModeResult, o: ModeResult) -> Dict[str, Optional[float]]:
    """How many times faster `o` is than `b`, per expert step, projected total and VAE."""
    out: Dict[str, Optional[float]] = {}
    for expert in EXPERTS:
        bs, os_ = b['steps'][expert]['median_seconds'], o['steps'][expert]['median_seconds']
        out[f'step_{expert}'] = bs / os_ if bs and os_ else None
    pb, po = b.get('projected_40_step_seconds'), o.get('projected_40_step_seconds')
    out['projected_40_step'] = pb / po if pb and po else None
    # the VAE alone where recorded (older results: the whole decode stage)
    db, do = (m.get('vae_decode_seconds') or m['decode_seconds'] for m in (b, o))
    out['vae_decode'] = statistics.median(db) / statistics.median(do) if db and do else None
    return out


def derive(result: BenchmarkResult) -> BenchmarkResult:
    """Numbers computed from the measurements, in place (idempotent; also for results saved
    before a run finished): per-forward time, achieved TFLOP/s, 40-step projections,
    speed-ups, ratio to the floor."""
    flops = result['flops_per_forward']['total']
    split = result['projection_split_40']
    for r in result['modes'].values():
        for expert in EXPERTS:
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
        result['speedup'] = speedups(modes['baseline'], modes['optimized'])
        if 'baseline_same_kernel' in modes:
            result['speedup_same_kernel'] = speedups(modes['baseline_same_kernel'],
                                                     modes['optimized'])
    floor = result.get('floor_per_forward')
    # the ideal step on N GPUs: the two forwards' floor spread evenly over the N GPUs
    world = (result.get('parallel') or {}).get('world_size', 1)
    if floor and 'optimized' in modes:
        for expert in EXPERTS:
            s = modes['optimized']['steps'][expert]
            if s['median_seconds']:
                s['ratio_to_floor'] = s['median_seconds'] / (2 * floor['seconds'] / world)
    return result


def mixed_step_seconds(result: BenchmarkResult, mode: str) -> Optional[float]:
    """The step time of a real generation: the 40-step mix of the two experts' medians."""
    m = result['modes'][mode]['steps']
    split = result['projection_split_40']
    hi, lo = m['high']['median_seconds'], m['low']['median_seconds']
    return (split['high'] * hi + split['low'] * lo) / PROJECTION_STEPS if hi and lo else None


def derive_scaling(combined: ScalingResult,
                   one_gpu_step_seconds: Optional[float] = None) -> ScalingResult:
    """Per-step time at N GPUs against 1 GPU (same mode, same size), efficiency, projections.

    A run's step time is `mixed_step_seconds`, so both experts count as they do in a real
    generation. The one-GPU step is this file's 1-process run, or `one_gpu_step_seconds`
    (from another file on the same machine) when it has none.
    """
    rows: List[Dict[str, Any]] = []
    for run in combined['runs']:
        res = run.get('result')
        if not res or not res.get('modes'):
            rows.append({'nproc': run['nproc'], 'cfg_parallel': run['cfg_parallel'],
                         'error': f"exit {run['returncode']}, no result"})
            continue
        derive(res)
        mode = 'optimized' if 'optimized' in res['modes'] else next(iter(res['modes']))
        m = res['modes'][mode]
        rows.append({'nproc': run['nproc'], 'ulysses_size': run['ulysses_size'],
                     'cfg_parallel': run['cfg_parallel'], 'mode': mode,
                     'step_high_seconds': m['steps']['high']['median_seconds'],
                     'step_low_seconds': m['steps']['low']['median_seconds'],
                     'step_seconds': mixed_step_seconds(res, mode),
                     'projected_40_step_seconds': m.get('projected_40_step_seconds'),
                     'peak_gpu_gib_per_rank': m.get('peak_gpu_gib_per_rank'),
                     'ratio_to_floor_high': m['steps']['high'].get('ratio_to_floor'),
                     'gpu': res['env'].get('gpu'), 'torch': res['env'].get('torch'),
                     'attention_backend': m.get('attention_backend'),
                     'size': res['size'], 'frame_num': res['frame_num'],
                     'sample_steps': res['sample_steps'],
                     'projection_split_40': res['projection_split_40'],
                     'partial': run.get('partial')})
    one = next((r['step_seconds'] for r in rows
                if r.get('nproc') == 1 and r.get('step_seconds')), one_gpu_step_seconds)
    for r in rows:
        if one and r.get('step_seconds'):
            r['speedup_vs_1'] = one / r['step_seconds']
            r['scaling_efficiency'] = r['speedup_vs_1'] / r['nproc']
    combined['scaling'] = rows
    return combined


# ----------------------------------------------------------------------------- files
def load_result(path: str) -> Dict[str, Any]:
    """A results file of either schema, with its derived numbers recomputed."""
    with open(path) as f:
        data = json.load(f)
    if data.get('schema') == SCALING_SCHEMA:
        return derive_scaling(data)
    if data.get('schema') == SCHEMA:
        return derive(data)
    return data  # a diagnostic's file (bench/vae_check.py): nothing to derive


def write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so
    that `path` holds either the previous content or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=folder)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def partial_path(path: str) -> str:
    """Where a run keeps what it has measured so far (removed once `path` is written)."""
    return path + '.partial'


def write_final(path: str, data: Dict[str, Any]) -> None:
    """The finished result at `path`; the run's partial file goes."""
    write_json_atomic(path, data)
    if os.path.exists(partial_path(path)):
        os.remove(partial_path(path))
