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
    # bench/placement_check.py: resident vs every GPU cap (block streaming), one process per size
    'placement_480p': 'h200_placement_832x480_9877069.json',
    'placement_720p': 'h200_placement_1280x720_9877069.json',
    # bench/activation_check.py: what is live at one compiled forward's peak, before / after
    'activation_720p_before': 'h200_activation_1280x720_9168104.json',
    'activation_720p': 'h200_activation_1280x720_9877069.json',
    'activation_480p': 'h200_activation_832x480_9877069.json',
    # bench/peer.py: diffusers' transformer beside ours, same process (before / after)
    'peer_before': 'h200_peer_diffusers_9168104.json',
    'peer': 'h200_peer_diffusers_024ccd7.json',
    # an H200 benchmark run whose ceilings (FA3 at 75,600 tokens, bf16 GEMM rate) bound both
    # sides of the 1280*720 peer comparison
    'ceilings_720p_h200': 'h200_1280x720_lightning_9168104.json',
    # bench/fp8_pipeline_check.py: fp8 variants of a whole generation vs bf16, one process
    'fp8_480p': 'h200_fp8_pipeline_832x480_7635196.json',
    'fp8_720p': 'h200_fp8_pipeline_1280x720_9877069.json',
    # bench/placement_check.py --quantize all: fp8 experts (quantized while loading) resident
    # and streamed under a 16 GiB cap
    'placement_fp8_480p': 'h200_placement_fp8_832x480_f899ab4.json',
    # bench/fp8_forward_check.py: one expert forward per fp8 variant (relative error)
    'fp8_forward_480p': 'h200_fp8_forward_832x480_7635196.json',
    'fp8_forward_720p': 'h200_fp8_forward_1280x720_9168104.json',
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
    return '\n\n'.join(_placement_rows(name) for name in ('placement_480p', 'placement_720p'))


# the GPU sizes of the guide's table: label, the cap placement_check ran under (None: no cap)
GPU_SIZES = [('16 GB', 16.0), ('24 GB (RTX 4090)', 24.0), ('32 GB', 32.0),
             ('40 GB (A100 40GB)', 40.0), ('48 GB (L40S, A6000)', 48.0),
             ('80 GB (H100, A100 80GB)', 80.0), ('141 GB (H200, no cap)', None)]


def _plan_short(plan: str) -> str:
    """The experts' and T5's part of a logged plan."""
    parts = plan.split('; GPU peak')[0].split('; ')
    keep = [x for x in parts if 'resident' in x or 'streamed' in x or x.startswith('T5')]
    return '; '.join(dict.fromkeys(keep))


def _slower(d: dict):
    xs = [v for v in (d or {}).values() if v]
    return max(xs) if xs else None


def _judged(t, x, nd: int, where: str = '') -> str:
    """'<meaning>[ at <where>] ≤ <bound>: <measured> (<verdict>)' for target `t`."""
    op = '≤' if t.kind == 'at most' else '≥'
    return (f"{t.meaning}{' at ' + where if where else ''} {op} {t.value:g}{t.unit}: "
            f"{f(x, nd)}{t.unit} ({verdict(t, x)})")


def table_gpu_sizes() -> str:
    """One row per GPU size, one column per video size: the plan and the measured step."""
    runs = {(x['size'], x['cap_gib']): x for name in ('placement_480p', 'placement_720p')
            for x in load_raw(name)['runs']}
    sizes = ('832*480', '1280*720')
    rows = ['| GPU (`--gpu_memory_gib`) | 832*480, 81 frames | 1280*720, 81 frames |',
            '|---|---|---|']
    for label, cap in GPU_SIZES:
        cells = []
        for size in sizes:
            r = runs.get((size, cap))
            if r is None:
                cells.append('n/m')
            elif 'error' in r:
                cells.append('refused by the planner: ' + r['error'].split(': ', 1)[1]
                             .split(': use')[0])
            else:
                ratio = _slower(r.get('step_ratio_to_first_run'))
                cells.append(f"{_plan_short(r['plan'])}: step {f(r['step_seconds']['high'])} / "
                             f"{f(r['step_seconds']['low'])} s"
                             + (f" ({f(ratio, 3)}x resident)" if ratio else ' (resident)')
                             + f", peak {f(r['peak_gpu_gib'], 1)} GiB")
        rows.append(f"| {label} | {' | '.join(cells)} |")
    r4, r7 = runs[('832*480', 16.0)], runs[('1280*720', 24.0)]
    checks = [('streamed_step_ratio', '480p', _slower(r4.get('step_ratio_to_first_run'))),
              ('streamed_step_ratio', '720p', _slower(r7.get('step_ratio_to_first_run'))),
              ('streamed_peak_gib', '720p', r7.get('peak_gpu_gib'))]
    rows += ['', 'Targets: ' + '; '.join(
        _judged(target(n, sz), x, 3 if 'ratio' in n else 1,
                '832*480' if sz == '480p' else '1280*720') for n, sz, x in checks)
        + f"; decoded video under the 24 GiB cap vs resident: "
        f"{'identical' if r7.get('identical_to_first_run') else 'different'}."]
    rows += ['', 'Measured on one H200 (the cap is enforced on the allocator, so each row '
                 'emulates a GPU of that size), random bf16 weights, 2 steps (one per expert); '
                 'step = DiT step of the high-noise / low-noise expert; the ratio is against '
                 'the uncapped run of the same process. Sources: '
                 f"`bench/results/{RUNS['placement_480p']}` and "
                 f"`bench/results/{RUNS['placement_720p']}` (commit "
                 f"{commit_of('placement_720p')}; full plans in the table below)."]
    return '\n'.join(rows)


def table_activation() -> str:
    """The activation peak of one forward: before / after, eager / compiled, vs diffusers."""
    peer, before = load_raw('peer'), load_raw('peer_before')
    act = {'832*480': load_raw('activation_480p'), '1280*720': load_raw('activation_720p')}
    act_before = {'1280*720': load_raw('activation_720p_before')}
    rows = [f"| size | compiled, commit {commit_of('peer_before')} (GiB) | compiled, commit "
            f"{commit_of('peer')} (GiB) | eager, {commit_of('activation_720p')} (GiB) | "
            f"diffusers compiled + FA3 (GiB) | per token now (KiB) |",
            '|---|---|---|---|---|---|']
    for size, a in act.items():
        now = peer['sizes'][size]['ours']['activation_peak_gib']
        was = before['sizes'][size]['ours']['activation_peak_gib']
        eager_before = act_before.get(size, {}).get('variants', {}).get('eager', {})
        eager = a['variants']['eager']['activation_peak_gib']
        eager_text = f(eager) + (f" (was {f(eager_before['activation_peak_gib'])})"
                                 if eager_before else '')
        rows.append(f"| {size} | {f(was)} | {f(now)} | {eager_text} | "
                    f"{f(peer['sizes'][size]['diffusers_compiled']['activation_peak_gib'])} | "
                    f"{f(now * 2**30 / 1024 / a['tokens'], 1)} |")
    t = target('activation_peak_gib', '720p')
    now7 = peer['sizes']['1280*720']['ours']['activation_peak_gib']
    rows += ['', f"Target: {_judged(t, now7, 2, '1280*720')}.",
             '', 'Activation peak = peak allocated memory during one expert forward (batch 1, '
                 '512 text tokens, random bf16 weights) minus what was allocated before it. '
                 'Sources: `bench/results/' + RUNS['peer_before'] + '`, `bench/results/'
                 + RUNS['peer'] + '` (the compiled columns and diffusers; 40 blocks), `'
                 + '`, `'.join(f'bench/results/{RUNS[n]}' for n in
                               ('activation_720p_before', 'activation_720p',
                                'activation_480p'))
                 + '` (eager; 2 blocks, the live tensors at the peak listed in each file).']
    return '\n'.join(rows)


def table_fp8() -> str:
    """fp8 variants of a whole generation against bf16, one process per size."""
    rows = ['| size | variant | fp8 parts | DiT step high / low (s) | step vs bf16 | '
            'final latent rel. error | video PSNR vs bf16 (dB) | expert weights (GiB) | '
            'peak GPU (GiB) |', '|---|---|---|---|---|---|---|---|---|']
    for name in ('fp8_480p', 'fp8_720p'):
        data = load_raw(name)
        for key, v in data['variants'].items():
            if 'error' in v:
                rows.append(f"| {data['size']} | `{key}` | {v['error']} | | | | | | |")
                continue
            parts = ' + '.join([', '.join(v['fp8_parts'])] * bool(v['fp8_parts'])
                               + ['self-attention (fa3_fp8)'] * bool(v['fp8_attention'])) \
                or 'none'
            a = v['vs_bf16']
            rows.append(f"| {data['size']} | `{key}` | {parts} | "
                        f"{f(v['step_seconds']['high'])} / {f(v['step_seconds']['low'])} | "
                        f"{f(_slower(v['step_ratio_to_bf16']), 3)}x | "
                        f"{f(a['latent_rel_err'], 4)} | "
                        f"{'bf16 itself' if a['psnr_db'] == float('inf') else f(a['psnr_db'], 1)}"
                        f" | {f(v['model_gib'] / 2, 1)} | {f(v['peak_gpu_gib'], 1)} |")
    rows += ['', 'One expert forward, relative error of its output vs bf16 (time vs bf16):', '']
    for name in ('fp8_forward_480p', 'fp8_forward_720p'):
        fw = load_raw(name)
        rows.append(f"- {fw['size']} (`bench/results/{RUNS[name]}`, commit {commit_of(name)}): "
                    + '; '.join(f"`{k}` {f(v['rel_err_vs_first'], 4)} "
                                f"({f(v['ratio_to_first'], 3)}x)"
                                for k, v in fw['variants'].items()
                                if 'error' not in v and k != 'bf16') + '.')
    d7 = load_raw('fp8_720p')
    best = d7['variants'].get('all+attn')
    if best and 'error' not in best:
        ts, tq = target('fp8_step_ratio', '720p'), target('fp8_psnr_db')
        x, q = _slower(best['step_ratio_to_bf16']), best['vs_bf16']['psnr_db']
        rows += ['', f"Targets at 1280*720: {_judged(ts, x, 3)}; {_judged(tq, q, 1)}."]
    d4 = load_raw('fp8_480p')
    rows += ['', f"Sources: `bench/results/{RUNS['fp8_480p']}` ({d4['steps']} steps, commit "
                 f"{commit_of('fp8_480p')}) and `bench/results/{RUNS['fp8_720p']}` "
                 f"({d7['steps']} steps, commit {commit_of('fp8_720p')}) — {d7['gpu']}, "
                 f"torch {d7['torch']}, {d7['frames']} frames, "
                 'both experts resident, compiled blocks, exact attention '
                 f"{d7['exact_attention']}; each variant ran on the same weights, prompt and "
                 'seed, half of the steps per expert. **Random weights**: the errors say how '
                 'far fp8 moves this network, not how a trained Wan2.2 reacts to it.']
    rows += ['', 'fp8 experts (`--quantize all`, quantized while loading) resident and under a '
                 '16 GiB cap (both streamed):', '', _placement_rows('placement_fp8_480p')]
    return '\n'.join(rows)


def table_peer() -> str:
    """Per-forward time and activation peak beside diffusers' transformer, same process."""
    rows = ['| commit | size | this project (s) | diffusers eager, best backend (s) | '
            'diffusers `compile_repeated_blocks` + FA3 (s) | this project vs diffusers compiled '
            '| activation peak, ours / diffusers compiled (GiB) |',
            '|---|---|---|---|---|---|---|']
    t = target('peer_speedup')
    verdicts = []
    for name in ('peer_before', 'peer'):
        data = load_raw(name)
        for size, r in data['sizes'].items():
            eager = min(v['seconds'] for v in r['diffusers_eager'].values())
            sp = r['ours_speedup_vs_diffusers_compiled']
            rows.append(f"| {commit_of(name)} | {size} | {f(r['ours']['seconds'], 3)} | "
                        f"{f(eager, 3)} | {f(r['diffusers_compiled']['seconds'], 3)} | "
                        f"{f(sp, 3)}x | {f(r['ours']['activation_peak_gib'])} / "
                        f"{f(r['diffusers_compiled']['activation_peak_gib'])} |")
            if name == 'peer':
                verdicts.append(f"{size} {f(sp, 3)}x ({verdict(t, sp)})")
    data = load_raw('peer')
    rows += ['', f"Target: {t.meaning} ≥ {t.value:g}{t.unit}: " + '; '.join(verdicts) + '.',
             '', f"One expert forward (one CFG branch, batch 1, 512 text tokens, random bf16 "
                 f"weights at the A14B widths), median of {data['reps']} after warm-up, "
                 f"{data['gpu']}, torch {data['torch']}, diffusers {data['diffusers']}, "
                 f"{data['frames']} frames. Sources: `bench/results/{RUNS['peer_before']}`, "
                 f"`bench/results/{RUNS['peer']}` (`bench/peer.py`, each file one process)."]
    rows += ['', _peer_budget()]
    return '\n'.join(rows)


def _peer_budget() -> str:
    """What a lead per forward at 1280*720 would take: both sides run the same FA3 kernel
    for self-attention, so the lead must come from the rest of the forward."""
    run = load_raw('ceilings_720p_h200')
    ceil, floor = run['ceilings'], run['floor_per_forward']
    row = load_raw('peer')['sizes']['1280*720']
    ours, theirs = row['ours']['seconds'], row['diffusers_compiled']['seconds']
    attn, gemm = floor['attention_seconds'], floor['gemm_seconds']
    lead = target('peer_speedup').value
    rest = theirs / lead - attn
    return (f"Where a lead would have to come from, at 1280*720: 40 self-attention calls of "
            f"FA3 alone take {f(attn)} s (standalone, {f(ceil['attention']['fa3']['tflops'], 0)} "
            f"TFLOP/s) and both sides call that kernel. The rest of the forward took "
            f"{f(ours - attn)} s here and {f(theirs - attn)} s in diffusers. A {lead:g}× lead "
            f"({f(theirs / lead)} s) leaves {f(rest)} s for everything but self-attention, "
            f"against {f(gemm)} s for the GEMMs alone at the measured bf16 rate "
            f"({f(ceil['gemm_bf16_tflops'], 0)} TFLOP/s): {f(rest - gemm)} s for the norms, "
            f"modulation, RoPE, gates, fp32 residual adds and cross-attention of 40 blocks. "
            f"No way to fit that budget without changing the reference's numerics was found "
            f"(a lossy path, fp8, is in OPTIMIZATION_GUIDE.md). Ceilings from "
            f"`bench/results/{RUNS['ceilings_720p_h200']}` (same GPU model, another process).")


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
    'gpu-sizes': table_gpu_sizes,
    'activation': table_activation,
    'fp8': table_fp8,
    'peer': table_peer,
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
