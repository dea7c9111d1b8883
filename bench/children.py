"""Benchmark runs launched as child processes (fresh-process ablations, torchrun scaling).

A child is `benchmark_t2v.py` with the parent's command line, less the options the launcher
sets itself, plus its own; it writes its JSON to a path the parent gives (`--output`), or
that path's `.partial` file when it stops part way.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .schema import BenchmarkResult, derive, partial_path

__all__ = ['SCRIPT', 'EXIT_OUT_OF_MEMORY', 'strip_options', 'run_child', 'read_child_result',
           'failure_reason']

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmark_t2v.py')
# the exit status of a benchmark that ran out of GPU memory (1 is any other refusal)
EXIT_OUT_OF_MEMORY = 3


def strip_options(argv: Sequence[str], options: Dict[str, Union[int, str]]) -> List[str]:
    """`argv` without the options named in `options` (name -> number of values it takes, or
    '*' / '+' for "the following values"), in `--name value` and `--name=value` forms."""
    out: List[str] = []
    skip_values = False
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split('=', 1)[0]
        if skip_values and not tok.startswith('-'):
            i += 1
            continue
        skip_values = False
        if name in options:
            n = options[name]
            if n in ('*', '+'):
                skip_values = '=' not in tok
            elif '=' not in tok:
                i += int(n)
            i += 1
            continue
        out.append(tok)
        i += 1
    return out


def run_child(cmd: Sequence[str], env: Optional[Dict[str, str]] = None) -> Tuple[int, float]:
    """Run one child to completion, its output on ours; (return code, wall seconds)."""
    t0 = time.perf_counter()
    rc = subprocess.call(list(cmd), env=env)
    return rc, time.perf_counter() - t0


def read_child_result(path: str) -> Tuple[Optional[BenchmarkResult], bool]:
    """(the child's result, whether it came from the partial file); (None, False) if none."""
    for candidate, partial in ((path, False), (partial_path(path), True)):
        if os.path.exists(candidate):
            with open(candidate) as f:
                return derive(json.load(f)), partial
    return None, False


def failure_reason(returncode: int) -> Optional[str]:
    """What a child's exit status says (None: it succeeded)."""
    if returncode == 0:
        return None
    if returncode == EXIT_OUT_OF_MEMORY:
        return 'out of GPU memory'
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return f'killed by {name}' + (' (out of host memory?)' if sig == signal.SIGKILL else '')
    return f'exit {returncode}'
