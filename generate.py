"""Generate a video from a text prompt with Wan2.2 T2V (reference behaviour).

Same flags and defaults as the reference `generate.py` (REFERENCE.md §8). Additions:
`--random_init` (every component with deterministic random weights, no checkpoint), the tiny
`t2v-tiny` task, and errors that come before any work: a missing checkpoint file, an empty
prompt, an unwritable output path or an unsupported flag stop the run at once, and a failing
save exits non-zero.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import warnings
from datetime import datetime

EXAMPLE_PROMPT = {
    't2v-A14B': 'Two anthropomorphic cats in comfy boxing gear and bright gloves fight '
                'intensely on a spotlighted stage.',
}
EXAMPLE_PROMPT['t2v-tiny'] = EXAMPLE_PROMPT['t2v-A14B']

# Flags of the reference's other tasks: they parse, and using one is an error here.
OTHER_TASK_FLAGS = {
    'image': None, 'audio': None, 'enable_tts': False, 'tts_prompt_audio': None,
    'tts_prompt_text': None, 'tts_text': None, 'pose_video': None, 'num_clip': None,
    'start_from_ref': False, 'infer_frames': 80, 'src_root_path': None, 'refert_num': 77,
    'replace_flag': False, 'use_relighting_lora': False, 'use_prompt_extend': False,
}


class UserError(Exception):
    """Bad input: reported as one line, exit status 1."""


def add_reference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The reference CLI's flags with the same names, types and defaults."""
    from wan.configs import SIZE_CONFIGS, WAN_CONFIGS
    from wan.utils.utils import str2bool
    parser.add_argument('--task', type=str, default='t2v-A14B', choices=list(WAN_CONFIGS),
                        help='The task to run.')
    parser.add_argument('--size', type=str, default=None, choices=list(SIZE_CONFIGS),
                        help='The area (width*height) of the generated video '
                             '(default 1280*720; the first supported size for t2v-tiny).')
    parser.add_argument('--frame_num', type=int, default=None,
                        help='How many frames to generate; must be 4n+1 (default: config).')
    parser.add_argument('--ckpt_dir', type=str, default=None,
                        help='The path to the checkpoint directory.')
    parser.add_argument('--offload_model', type=str2bool, default=None,
                        help='Offload models to CPU after each use to save GPU memory '
                             '(default: True on one GPU, False with several).')
    parser.add_argument('--ulysses_size', type=int, default=1,
                        help='The size of the Ulysses sequence-parallel group.')
    parser.add_argument('--cfg_parallel', action='store_true', default=False,
                        help='Run the conditional and unconditional passes on two halves of '
                             'the ranks (world size = 2 x ulysses_size; this project\'s '
                             'addition).')
    parser.add_argument('--t5_fsdp', action='store_true', default=False,
                        help='Shard the T5 encoder with FSDP.')
    parser.add_argument('--t5_cpu', action='store_true', default=False,
                        help='Keep the T5 encoder on the CPU.')
    parser.add_argument('--dit_fsdp', action='store_true', default=False,
                        help='Shard the DiT experts with FSDP.')
    parser.add_argument('--save_file', type=str, default=None,
                        help='The file to save the generated video to.')
    parser.add_argument('--prompt', type=str, default=None,
                        help='The prompt to generate the video from.')
    parser.add_argument('--use_prompt_extend', action='store_true', default=False,
                        help='Prompt extension (not supported by this project).')
    parser.add_argument('--prompt_extend_method', type=str, default='local_qwen',
                        choices=['dashscope', 'local_qwen'], help='(not supported)')
    parser.add_argument('--prompt_extend_model', type=str, default=None, help='(not supported)')
    parser.add_argument('--prompt_extend_target_lang', type=str, default='zh',
                        choices=['zh', 'en'], help='(not supported)')
    parser.add_argument('--base_seed', type=int, default=-1,
                        help='The seed for generation (-1: random).')
    parser.add_argument('--sample_solver', type=str, default='unipc',
                        choices=['unipc', 'dpm++'], help='The solver used to sample.')
    parser.add_argument('--sample_steps', type=int, default=None,
                        help='The sampling steps (default: config, 40).')
    parser.add_argument('--sample_shift', type=float, default=None,
                        help='Sampling shift factor for flow matching (default: config, 12).')
    parser.add_argument('--sample_guide_scale', type=float, default=None,
                        help='Classifier-free guidance scale for both experts (default: config '
                             '(3.0 low-noise, 4.0 high-noise)).')
    parser.add_argument('--convert_model_dtype', action='store_true', default=False,
                        help='Convert the DiT weights to the config param_dtype (bf16).')
    for name, default in OTHER_TASK_FLAGS.items():
        if name == 'use_prompt_extend':
            continue
        if isinstance(default, bool):
            parser.add_argument(f'--{name}', action='store_true', default=False,
                                help='(other Wan2.2 tasks; not supported by this project)')
        else:
            parser.add_argument(f'--{name}', type=type(default) if default is not None else str,
                                default=default,
                                help='(other Wan2.2 tasks; not supported by this project)')
    parser.add_argument('--random_init', action='store_true', default=False,
                        help='Build every model with deterministic random weights instead of '
                             'loading --ckpt_dir (demo and benchmarking; never chosen silently).')
    parser.add_argument('--random_init_seed', type=int, default=0,
                        help='Seed of the random weights with --random_init.')
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Generate a video from a text prompt with Wan2.2 (reference path).')
    return add_reference_args(parser)


def nearest_valid_frames(n: int) -> str:
    lo = max(1, ((n - 1) // 4) * 4 + 1)
    return f'{lo} or {lo + 4}' if lo != n else str(n)


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Fill defaults from the config and reject bad input before anything is built."""
    from wan.configs import SUPPORTED_SIZES, UNSUPPORTED_TASKS, WAN_CONFIGS, default_size
    if args.task in UNSUPPORTED_TASKS:
        raise UserError(f'task {args.task!r} is not supported by this project (text-to-video '
                        f'only: t2v-A14B, t2v-tiny)')
    for name, default in OTHER_TASK_FLAGS.items():
        if getattr(args, name) != default:
            raise UserError(f"--{name} is not supported by this project (it belongs to the "
                            f"reference's other tasks or prompt-extension backends)")
    cfg = WAN_CONFIGS[args.task]
    if args.ckpt_dir is None and not args.random_init:
        raise UserError('--ckpt_dir is required (or --random_init for random weights)')
    if args.ckpt_dir is not None and not args.random_init and not os.path.isdir(args.ckpt_dir):
        raise UserError(f'checkpoint directory not found: {args.ckpt_dir} '
                        f'(looked for {os.path.abspath(args.ckpt_dir)})')
    if args.size is None:
        args.size = default_size(args.task)
    if args.size not in SUPPORTED_SIZES[args.task]:
        raise UserError(f'unsupported size {args.size!r} for task {args.task}; supported '
                        f'sizes: {", ".join(SUPPORTED_SIZES[args.task])}')
    if args.sample_steps is None:
        args.sample_steps = cfg.sample_steps
    if args.sample_steps < 1:
        raise UserError('--sample_steps must be >= 1')
    if args.sample_shift is None:
        args.sample_shift = cfg.sample_shift
    if args.sample_guide_scale is None:
        args.sample_guide_scale = cfg.sample_guide_scale
    if args.frame_num is None:
        args.frame_num = cfg.frame_num
    if args.frame_num < 1 or (args.frame_num - 1) % 4 != 0:
        raise UserError(f'--frame_num must be of the form 4n+1; got {args.frame_num}, nearest '
                        f'valid: {nearest_valid_frames(args.frame_num)}')
    if args.prompt is None:
        args.prompt = EXAMPLE_PROMPT[args.task]
    if not args.prompt.strip():
        raise UserError('--prompt is empty; give a text prompt')
    if args.base_seed < 0:
        args.base_seed = random.randint(0, sys.maxsize)
    # Parallel layout: pure argument checks, identical on every rank and before any
    # collective, so a bad combination exits on every rank instead of hanging.
    if args.ulysses_size < 1:
        raise UserError(f'--ulysses_size must be >= 1, got {args.ulysses_size}')
    if world_size == 1:
        if args.t5_fsdp or args.dit_fsdp:
            raise UserError('--t5_fsdp/--dit_fsdp need a distributed launch (torchrun with '
                            'more than one process)')
        if args.ulysses_size > 1:
            raise UserError('--ulysses_size > 1 needs a distributed launch (torchrun '
                            '--nproc_per_node=N)')
        if args.cfg_parallel:
            raise UserError('--cfg_parallel needs a distributed launch with 2 x ulysses_size '
                            'processes (torchrun --nproc_per_node='
                            f'{2 * args.ulysses_size})')
    elif args.cfg_parallel:
        if world_size != 2 * args.ulysses_size:
            raise UserError(f'--cfg_parallel with --ulysses_size {args.ulysses_size} needs '
                            f'world size {2 * args.ulysses_size}, got {world_size}')
    else:
        if args.ulysses_size > 1 and args.ulysses_size != world_size:
            raise UserError(f'--ulysses_size {args.ulysses_size} must equal the world size '
                            f'{world_size}')
    if args.ulysses_size > 1 and cfg.num_heads % args.ulysses_size != 0:
        raise UserError(f'--ulysses_size {args.ulysses_size} must divide the {cfg.num_heads} '
                        f'attention heads')
    if args.save_file is None:
        args.save_file = default_save_file(args)
    check_writable(args.save_file)


def default_save_file(args: argparse.Namespace) -> str:
    formatted_time = datetime.now().strftime('%Y%m%d_%H%M%S')
    formatted_prompt = args.prompt.replace(' ', '_').replace('/', '_')[:50]
    size = args.size.replace('*', 'x') if sys.platform == 'win32' else args.size
    return f'{args.task}_{size}_{args.ulysses_size}_{formatted_prompt}_{formatted_time}.mp4'


def check_writable(path: str) -> None:
    """Refuse an output path that cannot be written, before minutes of generation."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f'cannot write --save_file {path}: folder {folder} does not exist')
    if os.path.isdir(path):
        raise UserError(f'cannot write --save_file {path}: it is a directory')
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f'cannot write --save_file {path}: permission denied')


def init_logging(rank: int) -> None:
    if rank == 0:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                            format='[%(asctime)s] %(levelname)s: %(message)s')
    else:
        logging.basicConfig(level=logging.ERROR, force=True)


def init_distributed(args: argparse.Namespace):
    """(rank, world_size, local_rank) from torchrun's environment; NCCL/gloo group if > 1."""
    import torch
    import torch.distributed as dist
    rank = int(os.getenv('RANK', 0))
    world_size = int(os.getenv('WORLD_SIZE', 1))
    local_rank = int(os.getenv('LOCAL_RANK', 0))
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend='nccl', init_method='env://', rank=rank,
                                    world_size=world_size)
        else:
            dist.init_process_group(backend='gloo', init_method='env://', rank=rank,
                                    world_size=world_size)
    return rank, world_size, local_rank


def save_output(video, args, fps: int) -> None:
    """Write the mp4; on failure remove any partial file and raise.

    A file that already existed and that the failed save never touched is left alone.
    """
    from wan.utils.utils import save_video

    def state(path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    logging.info('Saving generated video to %s', args.save_file)
    before = state(args.save_file)
    try:
        save_video(tensor=video[None], save_file=args.save_file, fps=fps, nrow=1,
                   normalize=True, value_range=(-1, 1))
    except Exception as exc:
        after = state(args.save_file)
        if after is not None and after != before:
            os.remove(args.save_file)
        raise UserError(f'failed to save the video to {args.save_file}: {exc}') from exc


def generate_and_save(pipe, args: argparse.Namespace, cfg, rank: int) -> None:
    """One video for args.prompt, written to args.save_file by rank 0."""
    from wan.configs import SIZE_CONFIGS
    logging.info('Generating video ...')
    video = pipe.generate(args.prompt, size=SIZE_CONFIGS[args.size], frame_num=args.frame_num,
                          shift=args.sample_shift, sample_solver=args.sample_solver,
                          sampling_steps=args.sample_steps, guide_scale=args.sample_guide_scale,
                          seed=args.base_seed, offload_model=args.offload_model)
    if rank == 0:
        save_output(video, args, cfg.sample_fps)


def build_pipeline(args, cfg, rank, local_rank, pipeline_cls=None, **extra):
    import wan
    cls = pipeline_cls or wan.WanT2V
    logging.info('Creating %s pipeline.', cls.__name__)
    return cls(config=cfg, checkpoint_dir=args.ckpt_dir, device_id=local_rank, rank=rank,
               t5_fsdp=args.t5_fsdp, dit_fsdp=args.dit_fsdp, use_sp=(args.ulysses_size > 1),
               t5_cpu=args.t5_cpu, convert_model_dtype=args.convert_model_dtype,
               random_init=args.random_init, random_init_seed=args.random_init_seed,
               cfg_parallel=getattr(args, 'cfg_parallel', False),
               ulysses_size=args.ulysses_size, **extra)


def generate(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from wan.configs import WAN_CONFIGS
    from wan.distributed.util import broadcast_seed

    rank, world_size, local_rank = init_distributed(args)
    init_logging(rank)
    if args.offload_model is None:
        args.offload_model = world_size == 1
        logging.info('offload_model is not specified, set to %s.', args.offload_model)
    validate_args(args, world_size)
    args.base_seed = broadcast_seed(args.base_seed)
    cfg = WAN_CONFIGS[args.task]
    logging.info('Generation job args: %s', args)
    logging.info('Generation model config: %s', cfg)
    logging.info('Input prompt: %s', args.prompt)

    pipe = build_pipeline(args, cfg, rank, local_rank)
    generate_and_save(pipe, args, cfg, rank)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.info('Finished.')


def main(argv=None, run=generate, parser=None) -> int:
    warnings.filterwarnings('ignore')
    args = (parser or _parser()).parse_args(argv)
    try:
        run(args)
    except (UserError, FileNotFoundError) as exc:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format='[%(asctime)s] %(levelname)s: %(message)s')
        logging.error('%s', exc)
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
