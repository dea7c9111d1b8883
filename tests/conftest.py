"""Shared fixtures: the repository root on sys.path and one tiny pipeline per session.

Building a t2v-tiny pipeline takes about a second; tests that need a fresh one (different
dtype, weights written to disk, optimized upgrade) build their own.
"""
from __future__ import annotations

import logging
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope='session')
def tiny_cfg():
    from wan.configs import WAN_CONFIGS
    return WAN_CONFIGS['t2v-tiny']


@pytest.fixture(scope='session')
def tiny_pipe(tiny_cfg):
    """The reference pipeline on the tiny config, random weights, CPU (bf16 autocast)."""
    from wan.text2video import WanT2V
    return WanT2V(tiny_cfg, None, random_init=True, device='cpu')


@pytest.fixture
def one_thread():
    """Run on one CPU thread: CPU kernels (VAE convs, reductions) may round differently with
    other thread counts, and bit-for-bit comparisons need one."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_logging():
    """Undo the CLIs' logging.basicConfig(force=True) after a test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
