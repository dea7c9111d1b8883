"""Record the reference pipeline's output on the tiny config, for the bit-identity test.

    python tests/data/record_reference_fixture.py

Writes tests/data/reference_tiny.pt: for each recorded case the final latent (exact) and the
SHA-256 of the decoded video's float32 bytes. tests/test_reference_fixture.py regenerates the
same cases and requires both to be identical, so that a refactor of the model, the pipeline
or the solvers cannot change what the reference path computes. Re-record only for an
intended change of the reference numerics (there should be none: the reference path follows
upstream Wan2.2), and say why in the commit message.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

# (name, generate() keyword arguments); both experts run in every case
CASES = {
    'unipc_bf16': dict(size=(128, 64), frame_num=9, shift=12.0, sample_solver='unipc',
                       sampling_steps=6, guide_scale=(3.0, 4.0), seed=42, offload_model=True),
    'dpm_bf16_portrait': dict(size=(64, 128), frame_num=5, shift=12.0, sample_solver='dpm++',
                              sampling_steps=5, guide_scale=5.0, seed=7, offload_model=False),
}
PROMPT = 'a red fox trots through fresh snow at dawn'


def video_digest(video: torch.Tensor) -> str:
    return hashlib.sha256(video.detach().float().contiguous().numpy().tobytes()).hexdigest()


def run_case(name: str):
    """(final latent, decoded video) of one case on a fresh tiny reference pipeline (CPU)."""
    from wan.configs import WAN_CONFIGS
    from wan.text2video import WanT2V
    pipe = WanT2V(WAN_CONFIGS['t2v-tiny'], None, random_init=True, random_init_seed=0,
                  device='cpu')
    seen = []
    decode = pipe.vae.decode

    def recording_decode(zs):
        seen.append(zs[0].detach().clone())
        return decode(zs)

    pipe.vae.decode = recording_decode  # test-side recording only
    video = pipe.generate(PROMPT, **CASES[name])
    return seen[-1], video


def native_bf16() -> bool:
    """Whether this CPU has AVX-512 bf16 dot products (avx512_bf16, e.g. AMD Zen 4 or Intel
    Sapphire Rapids): oneDNN then runs bf16 matmuls natively and rounds differently."""
    try:
        with open('/proc/cpuinfo') as f:
            return any(line.startswith('flags') and ' avx512_bf16' in line for line in f)
    except OSError:
        return False


def fixture_name(cpu_capability: str, bf16: bool = False) -> str:
    """One recording per CPU kernel family: CPU kernels round differently on AVX2, AVX-512
    and AVX-512 with native bf16, so bit-identity holds only against a recording made on the
    same family."""
    if cpu_capability == 'AVX512':
        return 'reference_tiny_avx512_bf16.pt' if bf16 else 'reference_tiny.pt'
    return f'reference_tiny_{cpu_capability.lower()}.pt'


def main() -> None:
    # the VAE decode on the CPU rounds differently with other thread counts: one thread here
    # and in the test
    torch.set_num_threads(1)
    out = {'cases': {}, 'torch': str(torch.__version__),
           'cpu_capability': torch.backends.cpu.get_cpu_capability(),
           'native_bf16': native_bf16(),
           'commit': subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                                    text=True, cwd=HERE).stdout.strip()}
    for name in CASES:
        x0, video = run_case(name)
        out['cases'][name] = {'x0': x0, 'video_sha256': video_digest(video),
                              'video_shape': tuple(video.shape)}
        print(name, tuple(video.shape), out['cases'][name]['video_sha256'][:16])
    torch.save(out, os.path.join(HERE, fixture_name(out['cpu_capability'], out['native_bf16'])))


if __name__ == '__main__':
    main()
