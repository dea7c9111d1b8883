"""Per-toggle ablation: each configuration in a fresh process.

    python benchmark_t2v.py --mode optimized --size 832*480 --ablate compile fast_rope

The parent builds nothing. It runs one child `benchmark_t2v.py` with the run's own toggles
(`none`) and one per listed toggle with that toggle flipped (`--no-X` when it is on, `--X`
when off), each writing its JSON to a temporary folder, and collects them into one result:
the `none` child's result with an `ablation` entry per configuration. A child that runs out
of memory (or dies) is recorded as such, and the next one runs. A fresh process per
configuration means no configuration inherits another's compiled graphs, allocator state or
converted weights.

The children build the experts with `--no-convert_model_dtype` (weights stored as in the
checkpoint, fp32), so that the optimized path's own weight policy is what is measured:
`bf16_weights` on stores the matmul weights in bf16, off keeps them in fp32.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

from .checks import RequestError
from .children import SCRIPT, failure_reason, read_child_result, run_child, strip_options
from .runs import print_table, result_path, toggle_names
from .schema import (AblationEntry, BenchmarkResult, partial_path, write_final,
                     write_json_atomic)

__all__ = ['ablation_names', 'child_command', 'ablation_entry', 'run_ablation']

# options the parent sets for each child: name -> number of values
_SET_BY_PARENT = {'--ablate': '*', '--ablate_steps': 1, '--output': 1, '--save_results': 0,
                  '--mode': 1, '--sample_steps': 1, '--convert_model_dtype': 0,
                  '--no-convert_model_dtype': 0}
NOTE = ('each configuration in its own process; experts built with --no-convert_model_dtype '
        '(fp32 at rest), so bf16_weights off means fp32 matmul weights')


def ablation_names(args: argparse.Namespace) -> List[str]:
    """The toggles to flip: those listed with --ablate, or every toggle that is on."""
    valid = toggle_names()
    if args.ablate:
        unknown = [t for t in args.ablate if t not in valid]
        if unknown:
            raise RequestError(f'--ablate {" ".join(unknown)}: not a toggle; valid: '
                               f'{", ".join(valid)}')
        return list(dict.fromkeys(args.ablate))
    return [t for t in valid if getattr(args, t)]


def child_command(args: argparse.Namespace, argv: List[str], name: str, output: str,
                  steps: int) -> List[str]:
    """The command line of one configuration (`none`: the run's own toggles)."""
    cmd = [sys.executable, SCRIPT, *strip_options(argv, _SET_BY_PARENT),
           '--mode', args.mode if name == 'none' else 'optimized', '--sample_steps', str(steps),
           '--no-convert_model_dtype']
    if name != 'none':  # after the parent's own toggle flags: the last one given wins
        cmd.append(f'--no-{name}' if getattr(args, name) else f'--{name}')
    return cmd + ['--output', output]


def ablation_entry(name: str, flipped_to: Optional[bool], returncode: int,
                   result: Optional[BenchmarkResult], command: List[str]) -> AblationEntry:
    """One configuration's line of the ablation: its step times, or why there are none."""
    entry: AblationEntry = {'returncode': returncode, 'command': ' '.join(command)}
    if flipped_to is not None:
        entry['flipped_to'] = flipped_to
    mode = ((result or {}).get('modes') or {}).get('optimized')
    if mode:
        entry.update(toggles=mode.get('toggles', {}), steps=mode['steps'],
                     peak_gpu_gib=mode['peak_gpu_gib'],
                     warmup_compile_seconds=mode.get('warmup_compile_seconds'),
                     t5_seconds=mode['t5_seconds'], switch_seconds=mode['switch_seconds'],
                     vae_decode_seconds=mode.get('vae_decode_seconds', []),
                     end_to_end_seconds=mode['end_to_end_seconds'])
    reason = failure_reason(returncode)
    if reason:
        entry['error'] = reason
        if result and result.get('error'):
            entry['error_detail'] = result['error']
    return entry


def run_ablation(args: argparse.Namespace, argv: List[str]) -> BenchmarkResult:
    """Run the configurations in turn; the combined result (written as the run goes)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    names = ablation_names(args)
    steps = args.ablate_steps or args.sample_steps
    tmp = tempfile.mkdtemp(prefix='wan_ablation_')
    combined: Optional[BenchmarkResult] = None
    entries: Dict[str, AblationEntry] = {}
    path: Optional[str] = None
    try:
        for name in ['none'] + names:
            flipped_to = None if name == 'none' else not getattr(args, name)
            out = os.path.join(tmp, f'{name}.json')
            cmd = child_command(args, argv, name, out, steps)
            logging.info('ablation run %s: %s', name, ' '.join(cmd))
            rc, _ = run_child(cmd)
            result, _ = read_child_result(out)
            entries[name] = ablation_entry(name, flipped_to, rc, result, cmd)
            if rc:
                logging.warning('ablation run %s failed: %s', name, entries[name]['error'])
            if combined is None and result is not None:
                combined = result if name == 'none' else {**result, 'modes': {}}
                path = _path(args, combined)
            if combined is not None:
                combined['ablation'] = entries
                combined['ablation_settings'] = {
                    'fresh_process': True, 'sample_steps': steps, 'convert_model_dtype': False,
                    'note': NOTE, 'command': ' '.join([os.path.basename(sys.executable),
                                                       *sys.argv])}
                write_json_atomic(partial_path(path), combined)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if combined is None:
        raise SystemExit('error: no ablation run produced a result: ' + '; '.join(
            f"{n}: {e['error']}" for n, e in entries.items()))
    combined.pop('error', None)  # the 'none' child's own state is in its entry
    write_final(path, combined)
    combined['output_path'] = path
    logging.info('results written to %s', path)
    print_table(combined)
    return combined


def _path(args: argparse.Namespace, result: BenchmarkResult) -> str:
    """--output, bench/results/ with --save_results, else a temporary file (printed)."""
    path = result_path(args, 'ablation', result['env'].get('gpu'))
    if path is None:
        fd, path = tempfile.mkstemp(prefix='wan_ablation_', suffix='.json')
        os.close(fd)
        logging.info('ablation results go to %s (--output or --save_results to choose)', path)
    return path
