"""Generate videos with the optimized Wan2.2 T2V pipeline (WanT2VOptimized).

All of generate.py's flags keep their meaning; the optimization toggles are added, with the
spellings users already have in their scripts. `--no-compile --no-batched_cfg --offload_model
True` (conservative mode) runs the reference computation.

    python generate_optimized.py --task t2v-A14B --size 1280*720 --ckpt_dir ./Wan2.2-T2V-A14B \
        --prompt "..."            # optimized defaults: compile, fastest attention
    python generate_optimized.py ... --prompt_file prompts.txt   # one video per line, one load
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import generate as ref_cli
from generate import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Generate videos with the optimized Wan2.2 T2V pipeline.')
    ref_cli.add_reference_args(parser)
    from wan.optimizations import add_cli_arguments
    g = parser.add_argument_group('run')
    g.add_argument('--no-offload', dest='no_offload', action='store_true', default=False,
                   help='Keep every model resident on the GPU (same as --offload_model False).')
    g.add_argument('--seed', dest='base_seed', type=int, default=argparse.SUPPRESS,
                   help='Alias of --base_seed.')
    g.add_argument('--gpu_memory_gib', type=float, default=None,
                   help='Use at most this much GPU memory (GiB), enforced on the allocator: '
                        'the memory plan streams expert blocks from page-locked host memory '
                        'when the experts do not fit (emulates a smaller GPU, or shares one).')
    g.add_argument('--prompt_file', type=str, default=None,
                   help='A text file with one prompt per line: the models load once and '
                        'one video is written per prompt.')
    # one flag (pair) per OptimizationConfig field (wan/optimizations.py)
    add_cli_arguments(parser)
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
    from wan.distributed.util import agree_on_seed
    from wan.optimizations import config_from_args
    from wan.text2video_optimized import WanT2VOptimized

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
    # many prompts on several processes: replicas of the pipeline (each cfg x ulysses ranks)
    # share the prompts out; one prompt, or FSDP-sharded models, keep one pipeline
    args.data_parallel = 1
    if prompts is not None and world_size > 1 and not (args.dit_fsdp or args.t5_fsdp):
        from wan.distributed.cfg_parallel import data_parallel_layout
        try:
            args.data_parallel = data_parallel_layout(world_size, args.ulysses_size,
                                                      args.cfg_parallel)
        except ValueError as exc:
            raise UserError(f'--prompt_file on {world_size} processes: {exc}') from None
    ref_cli.validate_args(args, world_size)
    args.base_seed = agree_on_seed(args.base_seed)
    cfg = WAN_CONFIGS[args.task]
    logging.info('Generation job args: %s', args)
    logging.info('Generation model config: %s', cfg)

    try:
        opts = config_from_args(args)
    except ValueError as exc:  # e.g. an unknown --quantize part: before anything is built
        raise UserError(str(exc)) from None
    from wan.configs import SIZE_CONFIGS
    pipe = ref_cli.build_pipeline(args, cfg, rank, local_rank, pipeline_cls=WanT2VOptimized,
                                  optimizations=opts, gpu_memory_gib=args.gpu_memory_gib,
                                  plan_size=(SIZE_CONFIGS[args.size], args.frame_num),
                                  data_parallel=args.data_parallel)
    # --save_file NAME.mp4 becomes NAME_000.mp4, NAME_001.mp4, ... (one name for every rank)
    base, ext = os.path.splitext(save_pattern or _same_on_every_rank(args.save_file))
    info = getattr(pipe, 'parallel_info', None)
    replica = info.replica if info is not None else 0
    writer = getattr(pipe, 'rank', rank)  # the rank that writes, inside its replica
    started, done = time.perf_counter(), 0
    for i, prompt in enumerate(prompts or [args.prompt]):
        if i % args.data_parallel != replica:
            continue  # another replica's prompt
        args.prompt = prompt
        if prompts is not None:
            args.save_file = f'{base}_{i:03d}{ext}'
        logging.info('Input prompt %d: %s', i, prompt)
        ref_cli.generate_and_save(pipe, args, cfg, writer)
        done += writer == 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if dist.is_initialized():
        counts = [None] * world_size
        dist.all_gather_object(counts, (done, seconds))
        done, seconds = sum(c for c, _ in counts), max(s for _, s in counts)
        dist.barrier()
        dist.destroy_process_group()
    if prompts is not None:
        logging.info('%d videos in %.0f s: %.1f videos/hour (%d pipeline replica(s))', done,
                     seconds, 3600 * done / max(seconds, 1e-9), args.data_parallel)
    logging.info('Finished.')


def _same_on_every_rank(value):
    """Rank 0's value on every rank (e.g. a default file name with the time in it)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main(argv=None) -> int:
    return ref_cli.main(argv, run=generate, parser=_parser())


if __name__ == '__main__':
    sys.exit(main())
