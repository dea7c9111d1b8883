"""The numbers results are judged against: this project's targets and the seed material's
claims, in one table, and the verdict a measured value gets.

A target is a bound (`at most` / `at least`); a claim is a value someone stated, reproduced
when the measurement is within its tolerance. Keys ending in `_480p` / `_720p` hold for one
size (832*480 / 1280*720, 81 frames, one H100 80GB). Documents never write a verdict by hand:
`bench/render.py` computes each with `verdict` from the measured value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ['Target', 'TARGETS', 'target', 'verdict', 'claim_verdict']


@dataclass(frozen=True)
class Target:
    value: float
    kind: str           # 'at most', 'at least' or 'claim'
    meaning: str
    unit: str = ''
    tolerance: float = 0.0  # claims: the relative distance that still counts as reproduced


TARGETS: Dict[str, Target] = {
    'step_over_floor': Target(
        1.10, 'at most', 'optimized DiT step / floor step (floor measured in the same run), '
        'slower expert', ' x floor'),
    'step_seconds_480p': Target(5.0, 'at most', 'optimized DiT step, slower expert', ' s'),
    'step_seconds_720p': Target(20.4, 'at most', 'optimized DiT step, slower expert', ' s'),
    'speedup_vs_reference': Target(
        1.5, 'at least', 'speed-up per step vs the reference path, lesser expert', 'x'),
    'speedup_same_kernel': Target(
        1.25, 'at least', 'speed-up per step vs the reference path given the same attention '
        'kernel, lesser expert', 'x'),
    'end_to_end_seconds_480p': Target(
        230, 'at most', '40-step generation, projected from measured stages, load excluded',
        ' s'),
    'end_to_end_seconds_720p': Target(
        900, 'at most', '40-step generation, projected from measured stages, load excluded',
        ' s'),
    'peak_gpu_gib': Target(78, 'at most', 'peak GPU memory of the optimized path', ' GiB'),
    # the optimized path's video tolerance (bench/vae_check.py uses it too)
    'psnr_vs_reference_db': Target(
        40, 'at least', 'decoded video PSNR vs the reference path', ' dB'),
    # placement (block streaming under a GPU cap, bench/placement_check.py on one H200)
    'streamed_step_ratio_480p': Target(
        1.10, 'at most', 'DiT step with both experts streamed (16 GiB cap) / resident step, '
        'same run, slower expert', 'x'),
    'streamed_step_ratio_720p': Target(
        1.05, 'at most', 'DiT step with both experts streamed (24 GiB cap) / resident step, '
        'same run, slower expert', 'x'),
    'streamed_peak_gib_720p': Target(
        24, 'at most', 'peak GPU memory allocated under the 24 GiB cap', ' GiB'),
    'activation_peak_gib_720p': Target(
        6, 'at most', 'activation peak of one compiled forward, batch 1', ' GiB'),
    # fp8 (lossy, opt-in; bench/fp8_pipeline_check.py, random weights)
    'fp8_step_ratio_720p': Target(
        0.75, 'at most', 'all-fp8 DiT step (linears + attention) / bf16 step, same run', 'x'),
    'fp8_psnr_db': Target(
        30, 'at least', 'decoded video PSNR of an fp8 variant vs the bf16 path', ' dB'),
    # against diffusers' transformer (bench/peer.py, same process, same shapes)
    'peer_speedup': Target(
        1.05, 'at least', 'per-forward speed-up vs diffusers compiled + FA3', 'x'),
    # the seed material's claims (one H100, 1280*720, 81 frames, 40 steps)
    'claim_reference_seconds_720p': Target(
        300, 'claim', 'reference path, 40-step generation', ' s', tolerance=0.10),
    'claim_optimized_seconds_720p': Target(
        90, 'claim', 'optimized path, 40-step generation', ' s', tolerance=0.10),
    'claim_speedup_720p': Target(
        3.3, 'claim', 'speed-up of the optimized path, end to end', 'x', tolerance=0.10),
}


def target(name: str, size: Optional[str] = None) -> Target:
    """The target `name` for `size` ('480p' / '720p'): the sized entry, else the general."""
    return TARGETS.get(f'{name}_{size}') or TARGETS[name]


def _pct(x: float) -> str:
    return f'{abs(x) * 100:.1f}%'


def verdict(t: Target, measured: Optional[float]) -> str:
    """'met, 3.2% under' / 'missed by 5.7%' for a bound; 'n/m' without a measurement."""
    if measured is None:
        return 'n/m'
    rel = measured / t.value - 1
    if t.kind == 'at most':
        return f'met, {_pct(rel)} under' if rel <= 0 else f'missed by {_pct(rel)}'
    if t.kind == 'at least':
        return f'met, {_pct(rel)} over' if rel >= 0 else f'missed by {_pct(rel)}'
    raise ValueError(f'{t.kind!r} is not a bound; use claim_verdict')


def claim_verdict(t: Target, measured: Optional[float], implied_seconds: Optional[float] = None,
                  floor_seconds: Optional[float] = None) -> str:
    """Whether a claimed time or speed-up is reproduced by `measured`; when the claim implies
    a time (`implied_seconds`: the claimed time, or the optimized time a claimed speed-up
    implies) below the floor on this GPU, the verdict says so."""
    if measured is None:
        return 'n/m'
    rel = measured / t.value - 1
    if abs(rel) <= t.tolerance:
        return f'reproduced, {_pct(rel)} off'
    parts = [f'not reproduced: measured {measured / t.value:.2f}x the claim']
    if implied_seconds is not None and floor_seconds is not None and \
            implied_seconds < floor_seconds:
        what = '' if t.unit.strip() == 's' else ' (the time it implies)'
        parts.append(f'{implied_seconds:.0f} s{what} is below the floor of '
                     f'{floor_seconds:.0f} s')
    return '; '.join(parts)
