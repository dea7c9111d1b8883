"""Generate videos with the optimized Wan2.2 T2V pipeline (WanT2VOptimized).

All of generate.py's flags keep their meaning; the optimization toggles are added, with the
spellings users already have in their scripts. `--no-compile --no-batched_cfg --offload_model
True` (conservative mode) runs the reference computation.

    python generate_optimized.py --task t2v-A14B --size 1280*720 --ckpt_dir ./Wan2.2-T2V-A14B \
        --prompt "..."            # optimized defaults: compile, batched CFG, fastest attention
    python generate_optimized.py ... --prompt_file prompts.txt   # one video per line, one load
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import generate as ref_cli
from generate import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Generate videos with the optimized Wan2.2 T2V pipeline.')
    ref_cli.add_reference_args(parser)
    from wan.utils.utils import str2bool
    g = parser.add_argument_group('optimizations')
    g.add_argument('--no-offload', dest='no_offload', action='store_true', default=False,
                   help='Keep every model resident on the GPU (same as --offload_model False).')
    g.add_argument('--compile', dest='compile', action='store_true', default=True,
                   help='torch.compile the transformer blocks (default on).')
    g.add_argument('--no-compile', dest='compile', action='store_false',
                   help='Do not compile.')
    g.add_argument('--compile_mode', default='default',
                   choices=['default', 'reduce-overhead', 'max-autotune'],
                   help='torch.compile mode.')
    g.add_argument('--use_batched_cfg', dest='batched_cfg', action='store_true', default=False,
                   help='Conditional and unconditional passes in one batch-2 forward (exact; '
                        'off by default: measured no faster on H100, more memory).')
    g.add_argument('--no-batched_cfg', '--no-use_batched_cfg', dest='batched_cfg',
                   action='store_false', help='Two batch-1 passes per step, as the reference.')
    g.add_argument('--tf32', dest='tf32', action='store_true', default=False,
                   help='TF32 for the remaining fp32 matmuls (changes fp32-island precision).')
    g.add_argument('--no-tf32', dest='tf32', action='store_false', help='No TF32 (default).')
    g.add_argument('--attention', default='auto',
                   choices=['auto', 'reference', 'fa3', 'cudnn', 'flash', 'sdpa'],
                   help='Attention kernel (auto: fastest available).')
    g.add_argument('--seed', dest='base_seed', type=int, default=argparse.SUPPRESS,
                   help='Alias of --base_seed.')
    g.add_argument('--prompt_file', type=str, default=None,
                   help='A text file with one prompt per line: the models load once and '
                        'one video is written per prompt.')
    g.add_argument('--per_sample_time', type=str2bool, default=True,
                   help='Time embedding once per sample (exact; default True).')
    g.add_argument('--fast_rope', type=str2bool, default=True,
                   help='fp32 RoPE table instead of float64 (exact to fp32; default True).')
    g.add_argument('--vae_channels_last', type=str2bool, default=True,
                   help='VAE convolutions in channels-last layout (same math; default True).')
    return parser


def read_prompt_file(path: str) -> list:
    if not os.path.isfile(path):
        raise UserError(f'--prompt_file not found: looked for {os.path.abspath(path)}')
    with open(path, encoding='utf-8') as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f'--prompt_file {path} holds no prompt')
    return prompts


def generate(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from wan.configs import WAN_CONFIGS
    from wan.distributed.util import broadcast_seed
    from wan.text2video_optimized import OptimizationConfig, WanT2VOptimized

    rank, world_size, local_rank = ref_cli.init_distributed(args)
    ref_cli.init_logging(rank, args.debug)
    if args.no_offload:
        if args.offload_model:
            raise UserError('--no-offload contradicts --offload_model True')
        args.offload_model = False
    if args.offload_model is None:
        args.offload_model = False
        logging.info('offload_model is not specified, set to False (the memory plan decides '
                     'what stays on the GPU).')
    prompts = None
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise UserError('give either --prompt or --prompt_file, not both')
        prompts = read_prompt_file(args.prompt_file)
        args.prompt = prompts[0]
    save_pattern = args.save_file
    ref_cli.validate_args(args, world_size)
    args.base_seed = broadcast_seed(args.base_seed)
    cfg = WAN_CONFIGS[args.task]
    logging.info('Generation job args: %s', args)
    logging.info('Generation model config: %s', cfg)

    opts = OptimizationConfig(batched_cfg=args.batched_cfg, compile=args.compile,
                              compile_mode=args.compile_mode, tf32=args.tf32,
                              attention=args.attention, per_sample_time=args.per_sample_time,
                              fast_rope=args.fast_rope, resident=not args.offload_model,
                              vae_channels_last=args.vae_channels_last)
    pipe = ref_cli.build_pipeline(args, cfg, rank, local_rank, pipeline_cls=WanT2VOptimized,
                                  optimizations=opts)
    for i, prompt in enumerate(prompts or [args.prompt]):
        args.prompt = prompt
        if prompts is not None:
            # one file per prompt: --save_file NAME.mp4 becomes NAME_000.mp4, NAME_001.mp4, ...
            base, ext = os.path.splitext(save_pattern or ref_cli.default_save_file(args))
            args.save_file = f'{base}_{i:03d}{ext}'
        logging.info('Input prompt: %s', prompt)
        ref_cli.generate_and_save(pipe, args, cfg, rank)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.info('Finished.')


def main(argv=None) -> int:
    return ref_cli.main(argv, run=generate, parser=_parser())


if __name__ == '__main__':
    sys.exit(main())
