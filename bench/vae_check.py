"""VAE decode on the GPU, default layout vs channels-last: time and agreement (a diagnostic).

    python bench/vae_check.py --size 1280*720 --latent_frames 6 --output vae.json

Random VAE weights and a random latent; cuDNN autotuning on for both layouts; one untimed
decode per layout first; times from the shared `wan.utils.timing.Timer` (CUDA events). Exits 1
if the layouts disagree (PSNR below the optimized path's video tolerance,
`bench.targets.TARGETS['psnr_vs_reference_db']`).
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.schema import psnr, write_json_atomic  # noqa: E402
from bench.targets import TARGETS  # noqa: E402
from wan.configs import SIZE_CONFIGS  # noqa: E402
from wan.modules.vae2_1 import Wan2_1_VAE  # noqa: E402
from wan.utils.timing import Timer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', default='1280*720', choices=list(SIZE_CONFIGS))
    p.add_argument('--latent_frames', type=int, default=6, choices=range(1, 22),
                   metavar='1..21')
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--output', default=None)
    args = p.parse_args()
    w, h = SIZE_CONFIGS[args.size]
    torch.backends.cudnn.benchmark = True
    vae = Wan2_1_VAE(device='cuda', random_init_seed=1)
    z = torch.randn(16, args.latent_frames, h // 8, w // 8, device='cuda',
                    generator=torch.Generator('cuda').manual_seed(0))
    out = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
           'size': args.size, 'latent_frames': args.latent_frames, 'frames':
           1 + 4 * (args.latent_frames - 1), 'seconds': {}}
    videos = {}
    timer = Timer('cuda')
    for layout in ('default', 'channels_last'):
        vae.set_channels_last(layout == 'channels_last')
        untimed, times = [], []
        for i in range(args.reps + 1):
            with timer(times if i else untimed):  # the first decode autotunes
                video = vae.decode([z])[0]
        out['seconds'][layout] = statistics.median(times)
        videos[layout] = video.float().cpu()
        del video
        torch.cuda.empty_cache()
    a, b = videos['default'], videos['channels_last']
    out['max_abs_diff'] = (a - b).abs().max().item()
    out['psnr_db'] = psnr(a, b)  # the benchmark's agreement measure
    out['speedup'] = out['seconds']['default'] / out['seconds']['channels_last']
    print(json.dumps(out, indent=1), flush=True)
    if args.output:
        write_json_atomic(args.output, out)
    return 0 if out['psnr_db'] >= TARGETS['psnr_vs_reference_db'].value else 1


if __name__ == '__main__':
    sys.exit(main())
