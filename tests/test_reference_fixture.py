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
    """The recordings of this machine's CPU kernel family: the one its CPU flags name first,
    then any other recording made on a CPU of the same capability (the flags are a heuristic
    for which kernels oneDNN picks; bit-identity with one recording is what counts)."""
    cap = torch.backends.cpu.get_cpu_capability()
    data = os.path.join(HERE, 'data')
    first = fixture.fixture_name(cap, fixture.native_bf16())
    others = sorted({fixture.fixture_name(cap, bf16) for bf16 in (False, True)} - {first})
    found = [torch.load(os.path.join(data, n), weights_only=True)
             for n in [first, *others] if os.path.exists(os.path.join(data, n))]
    if not found:
        pytest.skip(f'no reference recording for CPU kernel family {cap} (bit-identity is per '
                    f'family): record one with tests/data/record_reference_fixture.py at the '
                    f'pre-refactor commit')
    return found


@pytest.mark.parametrize('name', list(fixture.CASES))
def test_reference_path_is_bit_identical_to_recording(recorded, one_thread, name):
    x0, video = fixture.run_case(name)
    digest = fixture.video_digest(video)
    for rec in recorded:
        want = rec['cases'][name]
        if torch.equal(x0, want['x0']) and digest == want['video_sha256']:
            return
    want = recorded[0]['cases'][name]
    assert tuple(video.shape) == tuple(want['video_shape'])
    diff = (x0.double() - want['x0'].double()).abs().max().item()
    assert torch.equal(x0, want['x0']), f'final latent changed (max abs diff {diff:.3e})'
    assert digest == want['video_sha256'], 'decoded video changed'
