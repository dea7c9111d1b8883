"""Rewrite the measured tables of the OPTIMIZATION_*.md documents from bench/results/*.json.

    python bench/render.py           # rewrite the tables in place
    python bench/render.py --check   # exit 1 if a document disagrees with the JSON (CI)

Each table sits between `<!-- BEGIN name -->` and `<!-- END name -->` markers; everything
else in the documents is prose. Every number in a table comes from a results file written by
benchmark_t2v.py on the GPU; derived numbers (speed-ups, 40-step projections, ratios) are
recomputed here with bench.schema.derive from the measured ones, and every verdict (target
met or missed, claim reproduced or not) is computed from them against bench.targets.TARGETS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.ceilings import GEMM_SIZE  # noqa: E402
from bench.schema import derive, derive_scaling, median  # noqa: E402
from bench.targets import claim_verdict, target, verdict  # noqa: E402

RESULTS = os.path.join(ROOT, 'bench', 'results')

# the runs the documents quote
RUNS = {
    '480p': 'h100_832x480_both_a9aec23.json',
    '720p': 'h100_1280x720_both_607d0d0.json',
    # the same run one commit before the VAE decode changes (decode stage before/after)
    '720p_decode_before': 'h100_1280x720_both_8d710fc.json',
    # the 720p run with torch.profiler breakdowns (earlier commit)
    '720p_profile': 'h100_1280x720_both_e5722e6.json',
    'ablation_batched': 'h100_832x480_ablation_batched_cfg_4b82afe.json',
    '480p_default': 'h100_832x480_optimized_6ac75b0.json',
    'ablation': 'h100_832x480_ablation_8d710fc.json',
    'scaling': 'h200x4_1280x720_scaling_8d710fc.json',
    'scaling_cfg': 'h200x4_1280x720_scaling_cfg_8d710fc.json',
    'vae_h100': 'h100_vae_check_720p81f_8d710fc.json',
    'vae_h200': 'h200_vae_check_720p21f_8d710fc.json',
    # after the seams refactor (issue 10), the same command as '480p' on an H200
    '480p_after_seams': 'h200_832x480_both_9a0d91b.json',
    # bench/placement_check.py: resident vs GPU caps (block streaming), one process
    'placement': 'h200_placement_9a0d91b.json',
    # the same script under the 16 / 40 / 48 GiB caps, after the VAE probe fix
    'placement_caps': 'h200_placement_9168104.json',
    # --ablate bf16_weights, one fresh process per configuration, no --convert_model_dtype
    'ablation_bf16': 'h200_832x480_ablation_bf16_weights_9168104.json',
}
# the runs of the ablation table, in order
ABLATION_RUNS = ('ablation_batched', '480p_default', 'ablation', 'ablation_bf16')
# the runs the targets are judged on: RUNS key -> size tag of bench.targets.TARGETS
TARGET_RUNS = {'480p': '480p', '720p': '720p'}
DOCS = ('OPTIMIZATION_SUMMARY.md', 'OPTIMIZATION_ANALYSIS.md', 'OPTIMIZATION_GUIDE.md',
        'README.md')


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, RUNS[name])) as f:
        return derive(json.load(f))


def load_raw(name: str) -> dict:
    with open(os.path.join(RESULTS, RUNS[name])) as f:
        return json.load(f)


def load_scaling(name: str, one_gpu_step_seconds=None) -> dict:
    """A --scaling results file with every run and the scaling rows re-derived (against
    `one_gpu_step_seconds` when the file has no one-GPU run)."""
    return derive_scaling(load_raw(name), one_gpu_step_seconds)


def f(x, nd=2, unit=''):
    if x is None:
        return 'n/m'
    if isinstance(x, float) and x == float('inf'):
        return 'identical'
    return f'{x:.{nd}f}{unit}'


med = median


def weights(r: dict) -> str:
    """What the run's weights were, from its settings."""
    st = r.get('settings', {})
    if st.get('ckpt_dir'):
        return 'checkpoint weights'
    return 'random bf16 weights' if st.get('convert_model_dtype', True) else \
        'random weights stored in fp32'


def commit_of(name: str) -> str:
    """The commit that ran, as named in the results file name (GIT_COMMIT given to the run).

    The JSONs of this session's device runs carry a wrong env.git_commit (cd05531...): the
    device's copy of the tree came with the session's initial .git, whose HEAD `git rev-parse`
    read; the code that ran was the working tree at the commit in the file name.
    """
    return os.path.splitext(RUNS[name])[0].rsplit('_', 1)[1]


def source(r: dict, name: str) -> str:
    e = r['env']
    return (f"Source: `bench/results/{RUNS[name]}` — {e['gpu']}, torch {e['torch']}, "
            f"{r['size']} × {r['frame_num']} frames (L = {r['tokens']:,}), "
            f"{r['sample_steps']} measured steps split between the experts (boundary "
            f"{r['boundary_used']:.3f}), {weights(r)}, commit {commit_of(name)}, "
            f"command `{e['command'].replace('/root/out/', '')}`.")


def table_stages(name: str) -> str:
    r = load(name)
    lines = [source(r, name), '',
             '| path | attention kernel | DiT step, high-noise (s) | DiT step, low-noise (s) '
             '| per forward (s) | achieved TFLOP/s | T5 encode (s) | expert swaps (s) '
             '| VAE decode (s) | peak GPU (GiB) | 40-step total, projected (s) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    labels = {'baseline': 'reference (`WanT2V`)',
              'baseline_same_kernel': 'reference, optimized kernel',
              'optimized': '`WanT2VOptimized`'}
    for key, m in r['modes'].items():
        hi, lo = m['steps']['high'], m['steps']['low']
        lines.append(
            f"| {labels.get(key, key)} | {m.get('attention_backend')} | "
            f"{f(hi['median_seconds'])} | {f(lo['median_seconds'])} | "
            f"{f(hi.get('seconds_per_forward'))} | {f(hi.get('achieved_tflops'), 0)} | "
            f"{f(med(m['t5_seconds']))} | {f(sum(m['switch_seconds']))} | "
            f"{f(med(m['decode_seconds']))} | {f(m['peak_gpu_gib'], 1)} | "
            f"{f(m.get('projected_40_step_seconds'), 0)} |")
    floor = r.get('floor_per_forward')
    if floor:
        opt = r['modes'].get('optimized', {}).get('steps', {}).get('high', {})
        lines += ['', f"Floor per forward, from ceilings measured in the same run: "
                      f"{f(floor['seconds'])} s = attention {f(floor['attention_seconds'])} s "
                      f"({floor['attention_kernel']}, "
                      f"{f(r['ceilings']['attention'][floor['attention_kernel']]['tflops'], 0)} "
                      f"TFLOP/s) + GEMM {f(floor['gemm_seconds'])} s (bf16 GEMM "
                      f"{f(r['ceilings']['gemm_bf16_tflops'], 0)} TFLOP/s); per step (2 "
                      f"forwards) {f(2 * floor['seconds'])} s. Optimized step / floor: "
                      f"{f(opt.get('ratio_to_floor'), 3)}."]
    sp = r.get('speedup')
    if sp:
        lines += ['', f"Speed-up of the optimized path, same run: per step "
                      f"{f(sp['step_high'])}× (high-noise) / {f(sp['step_low'])}× (low-noise); "
                      f"projected 40-step total {f(sp['projected_40_step'])}×."]
    sk = r.get('speedup_same_kernel')
    if sk:
        lines += [f"Against the reference path given the same attention kernel: "
                  f"{f(sk['step_high'])}× / {f(sk['step_low'])}× per step."]
    for key, label in (('agreement', 'optimized vs reference'),
                       ('agreement_reference_kernel_swap',
                        'reference vs reference with only the attention kernel swapped')):
        a = r.get(key)
        if a:
            lines += [f"Output agreement, {label} (same seed and weights): decoded video PSNR "
                      f"{f(a['psnr_db'], 1)} dB, max abs diff {f(a['max_abs_diff'], 4)}, final "
                      f"latent relative error {f(a.get('latent_rel_err'), 5)}."]
    if 'agreement' not in r:
        why = ('the run ended before the comparison; see the log next to the JSON'
               if {'baseline', 'optimized'} <= set(r['modes']) else
               f"the run had only the {', '.join(r['modes'])} mode")
        lines += [f'Output agreement: not measured in this run ({why}).']
    return '\n'.join(lines)


def profile_of(name: str, key: str):
    """The profile of a mode: from the JSON, else from the '[key] profile:' line of the log
    saved next to it (a run that ended after printing its profile but before saving it)."""
    r = load(name)
    p = r['modes'].get(key, {}).get('profile')
    if p and 'seconds_by_family' in p:
        return p, RUNS[name]
    log = os.path.join(RESULTS, RUNS[name].replace('.json', '.log'))
    if os.path.exists(log):
        with open(log) as fh:
            for line in fh:
                m = re.search(r'\[' + re.escape(key) + r'\] profile: (\{.*\})', line)
                if m:
                    groups = {k: float(v) for k, v in re.findall(r"'(\w+)': ([\d.]+)", m.group(1))}
                    return ({'seconds_by_family': groups, 'total_seconds': sum(groups.values())},
                            RUNS[name].replace('.json', '.log'))
    return None, None


def table_profile() -> str:
    lines = ['| size | path | attention | GEMM | fused (Triton) | other elementwise, copies, '
             'norms | total CUDA time per forward (s) |', '|---|---|---|---|---|---|---|']
    sources = []
    for name in ('480p', '720p_profile'):
        r = load(name)
        for key in ('baseline', 'optimized'):
            p, src = profile_of(name, key)
            if not p:
                continue
            sources.append(src)
            g = p['seconds_by_family']
            other = sum(v for k, v in g.items() if k not in ('attention', 'gemm', 'fused_triton'))
            lines.append(f"| {r['size']} | {key} ({r['modes'][key].get('attention_backend')}) | "
                         f"{f(g.get('attention', 0))} | {f(g.get('gemm', 0))} | "
                         f"{f(g.get('fused_triton', 0))} | {f(other)} | "
                         f"{f(p['total_seconds'])} |")
    lines += ['', 'Sources (torch.profiler, one batch-1 forward of the low-noise expert after '
              'a warm-up, CUDA time summed by kernel family): '
              + ', '.join(f'`bench/results/{s}`' for s in dict.fromkeys(sources)) + '.']
    return '\n'.join(lines)


def table_ablation() -> str:
    lines = ['| run | configuration | processes | DiT step, high-noise (s) | DiT step, low-noise '
             '(s) | peak GPU (GiB) |', '|---|---|---|---|---|---|']
    for name in ABLATION_RUNS:
        r = load(name)
        fresh = (r.get('ablation_settings') or {}).get('fresh_process', False)
        processes = 'one per configuration' if fresh else 'one for all'
        for key, a in (r.get('ablation') or {}).items():
            label = "the run's own toggles" if key == 'none' else \
                f"`{key}` {'on' if a.get('flipped_to') else 'off'}"
            if 'error' in a:
                lines.append(f"| `{RUNS[name]}` | {label} | {processes} | {a['error']} | | |")
                continue
            lines.append(f"| `{RUNS[name]}` | {label} (batched CFG "
                         f"{'on' if a['toggles'].get('batched_cfg') else 'off'}) | {processes} | "
                         f"{f(a['steps']['high']['median_seconds'])} | "
                         f"{f(a['steps']['low']['median_seconds'])} | "
                         f"{f(a['peak_gpu_gib'], 1)} |")
    return '\n'.join(lines)


def slower_step(r: dict, mode: str = 'optimized'):
    s = r['modes'][mode]['steps']
    xs = [s[e]['median_seconds'] for e in ('high', 'low') if s[e]['median_seconds']]
    return max(xs) if xs else None


def floor_40_steps(r: dict):
    """The floor of 40 denoising steps (two forwards each), DiT only."""
    floor = r.get('floor_per_forward')
    return 2 * floor['seconds'] * 40 if floor else None


def table_claims() -> str:
    r7 = load('720p')
    o, b = r7['modes']['optimized'], r7['modes']['baseline']
    sp = r7['speedup']
    floor = floor_40_steps(r7)
    tb, to, ts = (target(n, '720p') for n in ('claim_reference_seconds', 'claim_optimized_seconds',
                                              'claim_speedup'))
    pb, po = b['projected_40_step_seconds'], o['projected_40_step_seconds']
    return '\n'.join([
        f"| seed claim | measured here ({r7['env']['gpu']}, {r7['size']}, {r7['frame_num']} "
        f"frames, 40 steps) | verdict |",
        '|---|---|---|',
        f"| {tb.meaning}: ~{tb.value:.0f}{tb.unit} | reference path projected {f(pb, 0)} s (DiT "
        f"step {f(slower_step(r7, 'baseline'), 1)} s × 40, plus T5, swaps, VAE) | "
        f"{claim_verdict(tb, pb, tb.value, floor)} |",
        f"| {to.meaning}: ~{to.value:.0f}{to.unit} | optimized path projected {f(po, 0)} s | "
        f"{claim_verdict(to, po, to.value, floor)} |",
        f"| {ts.meaning}: {ts.value}{ts.unit} | {f(sp['projected_40_step'])}× projected end to "
        f"end, {f(sp['step_high'])}× per DiT step | "
        f"{claim_verdict(ts, sp['projected_40_step'], pb / ts.value if pb else None, floor)} |",
        '', f"Floor of 40 steps (DiT only, measured in the same run): {f(floor, 0)} s. "
            f"Source: `bench/results/{RUNS['720p']}`.",
    ])


def table_targets() -> str:
    runs = {tag: load(name) for name, tag in TARGET_RUNS.items()}
    first = next(iter(runs.values()))
    sizes = ' | '.join(r['size'] for r in runs.values())
    rows = [f"| target ({first['env']['gpu']}, {first['frame_num']} frames, {weights(first)}) "
            f"| {sizes} |", '|---' * (len(runs) + 1) + '|']

    def lesser(sp):
        xs = [sp[k] for k in ('step_high', 'step_low') if sp and sp.get(k)]
        return min(xs) if xs else None

    def ratio(r):
        s = r['modes']['optimized']['steps']
        xs = [s[e].get('ratio_to_floor') for e in ('high', 'low') if s[e].get('ratio_to_floor')]
        return max(xs) if xs else None

    def psnr(r):
        return (r.get('agreement') or {}).get('psnr_db')

    def peak_note(r):
        plan = r['modes']['optimized'].get('memory_plan') or {}
        return 'both experts resident' if plan.get('experts_resident') else 'experts swapped'

    # name in TARGETS -> (measured value, number format, note after the value)
    measures = {
        'step_over_floor': (ratio, 3, None),
        'step_seconds': (slower_step, 2, None),
        'speedup_vs_reference': (lambda r: lesser(r.get('speedup')), 2, None),
        'speedup_same_kernel': (lambda r: lesser(r.get('speedup_same_kernel')), 2, None),
        'end_to_end_seconds': (lambda r: r['modes']['optimized']['projected_40_step_seconds'],
                               0, 'projected'),
        'peak_gpu_gib': (lambda r: r['modes']['optimized']['peak_gpu_gib'], 1, peak_note),
        'psnr_vs_reference_db': (psnr, 1, None),
    }
    for name, (measure, nd, note) in measures.items():
        ts = {tag: target(name, tag) for tag in runs}
        t0 = next(iter(ts.values()))
        op = '≤' if t0.kind == 'at most' else '≥'
        bounds = {f'{t.value:g}{t.unit}' for t in ts.values()}
        label = t0.meaning + (f' {op} {bounds.pop()}' if len(bounds) == 1 else ' (' + ' / '.join(
            f'{op} {t.value:g}{t.unit}' for t in ts.values()) + ')')
        cells = []
        for tag, r in runs.items():
            x = measure(r)
            if x is None:
                cells.append('n/m')
                continue
            extra = note(r) if callable(note) else note
            cells.append(f'{f(x, nd)}{ts[tag].unit}' + (f', {extra}' if extra else '') +
                         f' ({verdict(ts[tag], x)})')
        rows.append(f"| {label} | {' | '.join(cells)} |")
    rows += ['', 'From ' + ' and '.join(f'`bench/results/{RUNS[n]}`' for n in TARGET_RUNS)
             + '; n/m = not measured; targets from `bench/targets.py`.']
    return '\n'.join(rows)


PLANNER_GPUS = [('H200 141 GB (139 GiB)', 139), ('H100 / A100 80 GB (79 GiB)', 79.1),
                ('L40S / A6000 48 GB (47 GiB)', 47), ('A100 40 GB (39 GiB)', 39),
                ('32 GB (31 GiB)', 31), ('RTX 4090 24 GB (23 GiB)', 23),
                ('16 GB (15 GiB)', 15)]
PLANNER_HOST_GIB = 64


def table_planner() -> str:
    from wan.utils.memory_plan import GiB, plan_memory
    rows = ['| GPU (memory the pipeline may use) | 832*480, 81 frames | 1280*720, 81 frames |',
            '|---|---|---|']
    for label, budget in PLANNER_GPUS:
        cells = [plan_memory(budget * GiB, PLANNER_HOST_GIB * GiB, size, 81).describe()
                 for size in ((832, 480), (1280, 720))]
        rows.append(f'| {label} | {cells[0]} | {cells[1]} |')
    rows += ['', 'Computed by `wan.utils.memory_plan.plan_memory` (the planner the optimized '
                 'pipeline runs at every generate()) for a host with '
                 f'{PLANNER_HOST_GIB} GiB of available memory, not measured: the plan a GPU of '
                 'that size would get with the default toggles and the default 40-step '
                 'schedule (26 high-noise, 14 low-noise steps).']
    return '\n'.join(rows)


def table_key_figures() -> str:
    r4, r7 = load('480p'), load('720p')
    rows = ['| figure | 832*480 | 1280*720 |', '|---|---|---|']

    def step(r, mode):
        m = r['modes'].get(mode)
        return None if not m else m['steps']['high']['median_seconds']

    def prof(name, key, fam):
        p, _ = profile_of(name, key)
        if not p:
            return None
        g = p['seconds_by_family']
        if fam == 'other':
            return sum(v for k, v in g.items() if k not in ('attention', 'gemm', 'fused_triton'))
        return g.get(fam, 0.0)

    def pair(a, b, nd=2, unit=' s'):
        return f'{f(a, nd)}{unit} → {f(b, nd)}{unit}' if a is not None and b is not None \
            else 'n/m'

    floor = {n: load(n)['floor_per_forward'] for n in ('480p', '720p_profile')}
    kernels = ' / '.join(dict.fromkeys(fl['attention_kernel'].upper() for fl in floor.values()))
    from wan.configs import WAN_CONFIGS
    layers = WAN_CONFIGS[r4['task']].num_layers

    def vae(r, mode):  # the VAE alone where recorded, else the decode stage
        m = r['modes'][mode]
        return med(m.get('vae_decode_seconds') or m['decode_seconds'])
    rows += [
        '| (A) reference step, its own kernel → the optimized kernel (high-noise) | '
        f"{pair(step(r4, 'baseline'), step(r4, 'baseline_same_kernel'))} | "
        f"{pair(step(r7, 'baseline'), step(r7, 'baseline_same_kernel'))} |",
        '| (B) unfused elementwise/copies/norms per forward, reference → optimized (+ fused '
        'Triton) | ' + ' | '.join(
            f"{f(prof(n, 'baseline', 'other'))} s → {f(prof(n, 'optimized', 'other'))} s "
            f"(+ {f(prof(n, 'optimized', 'fused_triton'))} s)" for n in ('480p', '720p_profile'))
        + ' |',
        '| (C) expert swaps per video, reference → optimized | ' + ' | '.join(
            pair(sum(r['modes']['baseline']['switch_seconds']),
                 sum(r['modes']['optimized']['switch_seconds'])) for r in (r4, r7)) + ' |',
        '| (D) T5 encode, reference → optimized | ' + ' | '.join(
            pair(med(r['modes']['baseline']['t5_seconds']),
                 med(r['modes']['optimized']['t5_seconds'])) for r in (r4, r7)) + ' |',
        '| (E) VAE decode, reference → optimized (autotuning at warm-up, channels-last, '
        'one-buffer padding) | ' + ' | '.join(
            pair(vae(r, 'baseline'), vae(r, 'optimized')) for r in (r4, r7)) + ' |',
        f'| (F) per forward: attention in the optimized profile vs {layers} x standalone '
        f'{kernels} | '
        + ' | '.join(pair(floor[n]['attention_seconds'], prof(n, 'optimized', 'attention'))
                     for n in ('480p', '720p_profile')) + ' |',
        f'| (G) per forward: GEMMs in the optimized profile vs GEMM FLOPs at the {GEMM_SIZE}³ '
        'rate | '
        + ' | '.join(pair(floor[n]['gemm_seconds'], prof(n, 'optimized', 'gemm'))
                     for n in ('480p', '720p_profile')) + ' |',
        '| (H) optimized DiT step / floor step | ' + ' | '.join(
            f(r['modes']['optimized']['steps']['high'].get('ratio_to_floor'), 3)
            for r in (r4, r7)) + ' |',
        '| (I) first-call compile + warm-up of the optimized path | ' + ' | '.join(
            f"{f(r['modes']['optimized'].get('warmup_compile_seconds'), 1)} s"
            if r['modes']['optimized'].get('warmup_compile_seconds') is not None else
            f"{f(r['modes']['optimized']['steps']['high'].get('first_step_overhead_seconds'), 1)}"
            " s (first-step overhead)" for r in (r4, r7)) + ' |',
    ]
    rows += ['', f"From `bench/results/{RUNS['480p']}` and `bench/results/{RUNS['720p']}`; "
                 f"(B), (F), (G) at 720p from the profiled run `bench/results/"
                 f"{RUNS['720p_profile']}` (profiles of one batch-1 forward; its optimized "
                 'profile from the log next to the JSON); n/m = not measured.']
    return '\n'.join(rows)


def table_decode() -> str:
    """The 720p VAE decode stage before and after the decode changes, and the layout check."""
    rows = ['| run | reference decode (s) | optimized: experts moved to the host (s) | '
            'optimized: VAE (s) | optimized decode stage (s) | optimized peak GPU (GiB) |',
            '|---|---|---|---|---|---|']
    for name in ('720p_decode_before', '720p'):
        r = load(name)
        b, o = r['modes']['baseline'], r['modes']['optimized']
        stage, vae = med(o['decode_seconds']), med(o['vae_decode_seconds'])
        rows.append(f"| `{RUNS[name]}` | {f(med(b['decode_seconds']))} | {f(stage - vae)} | "
                    f"{f(vae)} | {f(stage)} | {f(o['peak_gpu_gib'], 1)} |")
    rows += ['', '| layout check (`bench/vae_check.py`, cuDNN autotuning on for both, one '
                 'untimed decode first) | default layout (s) | channels-last (s) | speed-up | '
                 'PSNR between them |', '|---|---|---|---|---|']
    for name in ('vae_h100', 'vae_h200'):
        v = load_raw(name)
        rows.append(f"| `{RUNS[name]}`: {v['gpu']}, {v['size']} × {v['frames']} frames | "
                    f"{f(v['seconds']['default'])} | {f(v['seconds']['channels_last'])} | "
                    f"{f(v['speedup'])}× | {f(v['psnr_db'], 1)} dB |")
    return '\n'.join(rows)


def table_scaling() -> str:
    """Ulysses / CFG-parallel scaling at 720p on the H200 x4 machine."""
    runs = load_scaling('scaling')
    one = next(r for r in runs['scaling'] if r.get('nproc') == 1 and r.get('step_seconds'))
    rows = ['| GPUs | layout | DiT step high / low (s) | speed-up vs 1 GPU | scaling efficiency '
            '| step / (floor / GPUs) | 40-step total, projected (s) | peak per GPU (GiB) | '
            'source |', '|---|---|---|---|---|---|---|---|---|']
    gpus = 1
    for name in ('scaling', 'scaling_cfg'):
        rows_of_file = load_scaling(name, one['step_seconds'])['scaling']
        gpus = max([gpus] + [r['nproc'] for r in rows_of_file])
        for r in sorted(rows_of_file, key=lambda r: (r['nproc'], r['cfg_parallel'])):
            if 'error' in r:
                rows.append(f"| {r['nproc']} | {r['error']} | | | | | | | `{RUNS[name]}` |")
                continue
            layout = (f"CFG parallel × Ulysses {r['ulysses_size']}" if r['cfg_parallel'] else
                      ('one GPU' if r['nproc'] == 1 else f"Ulysses {r['ulysses_size']}"))
            peaks = [p for p in r['peak_gpu_gib_per_rank'] if p is not None]
            rows.append(f"| {r['nproc']} | {layout} | {f(r['step_high_seconds'])} / "
                        f"{f(r['step_low_seconds'])} | {f(r['speedup_vs_1'])}× | "
                        f"{f(r['scaling_efficiency'])} | {f(r['ratio_to_floor_high'], 3)} | "
                        f"{f(r['projected_40_step_seconds'], 0)} | {f(max(peaks), 1)} | "
                        f"`{RUNS[name]}` |")
    e = one
    first = runs['runs'][0]['result']
    split = e['projection_split_40']
    toggles = first['modes'].get('optimized', {}).get('toggles') or {}
    rows += ['', f"{e['gpu']} × {gpus} (NVLink, NV18 between every pair), torch {e['torch']}, "
                 f"{e['size']} × {e['frame_num']} frames, `WanT2VOptimized` "
                 f"({e['attention_backend'] or 'n/m'} attention"
                 + (', compiled blocks' if toggles.get('compile') else '') + ") under torchrun, "
                 f"{e['sample_steps']} measured steps per run after a warm-up, {weights(first)}, "
                 f"commit {commit_of('scaling')}; each row one torchrun launched by "
                 f"`benchmark_t2v.py --scaling` (commands in the JSON). Step = the 40-step mix "
                 f"of the two experts' medians ({split['high']} high-noise, {split['low']} "
                 f"low-noise); efficiency = speed-up / GPUs against the one-GPU row of "
                 f"`{RUNS['scaling']}`; the 40-step totals are projected from measured stages "
                 f"(T5, steps, VAE decode on rank 0)."]
    return '\n'.join(rows)


def table_stages_after_seams() -> str:
    """The 480p both-modes run before (H100) and after (H200) the seams refactor: the
    optimized/reference ratio and the optimized step over the floor, each inside its own run."""
    rows = ['| run | GPU | commit | reference step (s) | optimized step (s) | speed-up per step '
            '| optimized step / floor | PSNR vs reference (dB) |', '|---|---|---|---|---|---|---|---|']
    for name in ('480p', '480p_after_seams'):
        r = load(name)
        b, o = r['modes']['baseline']['steps'], r['modes']['optimized']['steps']
        sp = r['speedup']
        rows.append(f"| `{RUNS[name]}` | {r['env']['gpu']} | {commit_of(name)} | "
                    f"{f(b['high']['median_seconds'])} / {f(b['low']['median_seconds'])} | "
                    f"{f(o['high']['median_seconds'])} / {f(o['low']['median_seconds'])} | "
                    f"{f(sp['step_high'], 2, 'x')} / {f(sp['step_low'], 2, 'x')} | "
                    f"{f(o['high'].get('ratio_to_floor'), 3)} / "
                    f"{f(o['low'].get('ratio_to_floor'), 3)} | "
                    f"{f(r['agreement']['psnr_db'], 1)} |")
    rows += ['', 'Each value pair is high-noise / low-noise expert; both modes ran in one process '
                 'on the same random weights (command in each JSON: `--mode both --size 832*480 '
                 '--sample_steps 2`). The two runs are on different GPUs, so only the in-run '
                 'ratios compare.']
    return '\n'.join(rows)


def table_placement() -> str:
    """bench/placement_check.py: the same generation resident and under GPU caps."""
    return '\n\n'.join(_placement_rows(name) for name in ('placement', 'placement_caps'))


def _placement_rows(name: str) -> str:
    data = load_raw(name)
    rows = [f"Source: `bench/results/{RUNS[name]}` — {data['gpu']}, torch "
            f"{data['torch']}, t2v-A14B, {data['frames']} frames, {data['steps']} measured "
            f"steps (one per expert), {data['weights']}, commit {commit_of(name)}, "
            f"command `{data['command'].replace('/root/out/', '')}`"
            + (f", peak host RSS {f(data['peak_host_rss_gib'], 1)} GiB"
               if data.get('peak_host_rss_gib') else '') + '.', '',
            '| size | GPU cap (GiB) | plan | DiT step high / low (s) | step vs resident '
            '| peak GPU allocated / reserved (GiB) | video vs resident |',
            '|---|---|---|---|---|---|---|']
    for r in data['runs']:
        cap = 'none' if r['cap_gib'] is None else f"{r['cap_gib']:g}"
        if 'error' in r:
            rows.append(f"| {r['size']} | {cap} | refused: {r['error']} | | | | |")
            continue
        st, ratio = r['step_seconds'], r.get('step_ratio_to_first_run')
        first = '(the resident run)' if r['cap_gib'] is None else \
            '(no resident run at this size in this file)'
        same = ('identical' if r.get('identical_to_first_run') else
                f"PSNR {f(r.get('psnr_vs_first_run_db'), 1)} dB") \
            if 'identical_to_first_run' in r else first
        ratio_text = f"{f(ratio['high'], 3)} / {f(ratio['low'], 3)}" if ratio else \
            ('1' if r['cap_gib'] is None else '-')
        base = next(x for x in data['runs'] if x['size'] == r['size'] and
                    x.get('step_seconds'))
        if ratio and base['cap_gib'] is not None:  # compared with a capped run, not resident
            ratio_text += f" (vs the {base['cap_gib']:g} GiB run)"
            same += f" (vs the {base['cap_gib']:g} GiB run)"
        rows.append(f"| {r['size']} | {cap} | {r['plan'].split('; GPU peak')[0]} | "
                    f"{f(st['high'])} / {f(st['low'])} | {ratio_text}"
                    f" | {f(r['peak_gpu_gib'], 1)} / {f(r['peak_gpu_reserved_gib'], 1)} | "
                    f"{same} |")
    return '\n'.join(rows)


TABLES = {
    'stages-after-seams': table_stages_after_seams,
    'placement': table_placement,
    'key-figures': table_key_figures,
    'targets': table_targets,
    'planner': table_planner,
    'stages-480p': lambda: table_stages('480p'),
    'stages-720p': lambda: table_stages('720p'),
    'profile': table_profile,
    'ablation': table_ablation,
    'claims': table_claims,
    'decode': table_decode,
    'scaling': table_scaling,
}

MARK = re.compile(r'(<!-- BEGIN (?P<name>[\w-]+) -->\n)(.*?)(<!-- END (?P=name) -->)', re.S)


def render_text(text: str) -> str:
    def sub(m):
        name = m.group('name')
        if name not in TABLES:
            raise KeyError(f'unknown table {name!r}')
        return m.group(1) + TABLES[name]() + '\n' + m.group(4)
    return MARK.sub(sub, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--check', action='store_true')
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        if not os.path.exists(path):
            continue
        with open(path, encoding='utf-8') as fh:
            text = fh.read()
        new = render_text(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, 'w', encoding='utf-8') as fh:
                    fh.write(new)
    if args.check and stale:
        print(f'out of date with bench/results: {", ".join(stale)} (run python bench/render.py)')
        return 1
    print('rewrote: ' + ', '.join(stale) if stale and not args.check else 'documents match')
    return 0


if __name__ == '__main__':
    sys.exit(main())
