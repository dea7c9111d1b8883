"""`--scaling`: one torchrun per GPU count, in turn, and the per-step scaling in one JSON.

    python benchmark_t2v.py --mode optimized --scaling 1 2 4 4c --output scaling.json

Each entry N runs N processes, one per GPU, with Ulysses over all of them; `Nc` runs CFG
parallelism x Ulysses N/2. The JSON (schema `wan-fast-benchmark-scaling/1`) holds every
run's result and the rows of `bench.schema.derive_scaling`. It is written to --output, under
bench/results/ with --save_results, else to a temporary file whose name is printed.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from typing import List, Tuple

from .checks import RequestError
from .children import SCRIPT, read_child_result, run_child, strip_options
from .runs import RESULTS_DIR, fmt, git_commit
from .schema import (SCALING_SCHEMA, ScalingResult, derive_scaling, partial_path, write_final,
                     write_json_atomic)

__all__ = ['parse_scaling_spec', 'child_argv', 'scaling_path', 'run_scaling', 'print_scaling']

# options the launcher sets per run: name -> number of values
_SET_BY_LAUNCHER = {'--scaling': '+', '--output': 1, '--ulysses_size': 1, '--save_results': 0,
                    '--cfg_parallel': 0}


def child_argv(argv: List[str]) -> List[str]:
    """The command line without the options the scaling launcher sets per run."""
    return strip_options(argv, _SET_BY_LAUNCHER)


def parse_scaling_spec(spec: str) -> Tuple[int, bool]:
    """'4' -> (4 processes, no CFG parallel); '4c' -> (4, CFG parallel, Ulysses 2)."""
    cfg = spec.endswith('c')
    try:
        n = int(spec[:-1] if cfg else spec)
    except ValueError:
        raise RequestError(f'--scaling entries are GPU counts like 4 or 4c, got {spec!r}')
    if n < 1 or (cfg and n % 2):
        raise RequestError(f'--scaling {spec}: needs N >= 1 (and even with c)')
    return n, cfg


def scaling_path(args: argparse.Namespace) -> str:
    """--output; bench/results/ with --save_results; else a new temporary file."""
    if args.output:
        return args.output
    if args.save_results:
        stamp = datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')
        size = (args.size or 'default').replace('*', 'x')
        return os.path.join(RESULTS_DIR, f'scaling_{args.task}_{size}_{stamp}.json')
    fd, path = tempfile.mkstemp(prefix='wan_scaling_', suffix='.json')
    os.close(fd)
    return path


def run_scaling(args: argparse.Namespace, argv: List[str]) -> ScalingResult:
    """One torchrun per --scaling entry, in turn; their results and the scaling in one JSON."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    specs = [parse_scaling_spec(x) for x in args.scaling]
    path = scaling_path(args)
    logging.info('scaling results go to %s', path)
    base = child_argv(argv)
    tmp = tempfile.mkdtemp(prefix='wan_scaling_')
    combined: ScalingResult = {
        'schema': SCALING_SCHEMA, 'command': ' '.join([os.path.basename(sys.executable),
                                                       *sys.argv]),
        'git_commit': git_commit(),
        'date_utc': datetime.now(timezone.utc).isoformat(timespec='seconds'), 'runs': []}
    try:
        for n, cfg in specs:
            ulysses = n // 2 if cfg else n
            out = os.path.join(tmp, f'n{n}{"c" if cfg else ""}.json')
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                   f'--nproc_per_node={n}', SCRIPT, *base, '--ulysses_size', str(ulysses),
                   '--output', out] + (['--cfg_parallel'] if cfg else [])
            logging.info('scaling run: %d process(es), ulysses %d, cfg parallel %s', n,
                         ulysses, cfg)
            rc, wall = run_child(cmd)
            entry = {'nproc': n, 'ulysses_size': ulysses, 'cfg_parallel': cfg,
                     'returncode': rc, 'wall_seconds': wall, 'command': ' '.join(cmd)}
            result, partial = read_child_result(out)
            if result is not None:
                entry.update(result=result, partial=partial)
            if rc != 0:
                logging.warning('scaling run with %d process(es) failed (exit %d)', n, rc)
            combined['runs'].append(entry)
            derive_scaling(combined)
            write_json_atomic(partial_path(path), combined)  # a later failure loses nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_final(path, combined)
    combined['output_path'] = path
    logging.info('results written to %s', path)
    print_scaling(combined)
    return combined


def print_scaling(combined: ScalingResult) -> None:
    lines = [f"{'GPUs':<6}{'layout':<16}{'step hi':>9}{'step lo':>9}{'step':>8}{'speedup':>9}"
             f"{'eff':>7}{'proj40':>8}{'peak/GPU':>10}"]
    for r in combined['scaling']:
        if 'error' in r:
            lines.append(f"{r['nproc']:<6}{r['error']}")
            continue
        layout = f"U{r['ulysses_size']}" + (' x CFG2' if r['cfg_parallel'] else '')
        peaks = [p for p in (r['peak_gpu_gib_per_rank'] or []) if p is not None]
        lines.append(f"{r['nproc']:<6}{layout:<16}{fmt(r['step_high_seconds']):>9}"
                     f"{fmt(r['step_low_seconds']):>9}{fmt(r['step_seconds']):>8}"
                     f"{fmt(r.get('speedup_vs_1'), 'x'):>9}"
                     f"{fmt(r.get('scaling_efficiency'), '', 2):>7}"
                     f"{fmt(r['projected_40_step_seconds'], '', 0):>8}"
                     f"{fmt(max(peaks) if peaks else None, '', 1):>10}")
    print('\n'.join(lines))
