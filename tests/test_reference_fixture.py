"""The reference path is bit-identical to its recording made before the seams refactor.

tests/data/reference_tiny*.pt were written by tests/data/record_reference_fixture.py at the
commit named inside them (the pre-refactor tree), one per CPU kernel family: CPU kernels round
differently on AVX2, AVX-512 and AVX-512 with native bf16, so the comparison uses the recording
of this machine's family. Any change to the model, attention, solvers, VAE, T5 or WanT2V that
alters one bit of the reference path's final latent or decoded video fails here.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'data'))
import record_reference_fixture as fixture  # noqa: E402


@pytest.fixture(scope='module')
def recorded():
    cap = torch.backends.cpu.get_cpu_capability()
    path = os.path.join(HERE, 'data', fixture.fixture_name(cap, fixture.native_bf16()))
    if not os.path.exists(path):
        pytest.skip(f'no reference recording for CPU kernel family {cap} (bit-identity is per '
                    f'family): record one with tests/data/record_reference_fixture.py at the '
                    f'pre-refactor commit')
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize('name', list(fixture.CASES))
def test_reference_path_is_bit_identical_to_recording(recorded, one_thread, name):
    want = recorded['cases'][name]
    x0, video = fixture.run_case(name)
    assert tuple(video.shape) == tuple(want['video_shape'])
    diff = (x0.double() - want['x0'].double()).abs().max().item()
    assert torch.equal(x0, want['x0']), f'final latent changed (max abs diff {diff:.3e})'
    assert fixture.video_digest(video) == want['video_sha256'], 'decoded video changed'
