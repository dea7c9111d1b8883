"""Generate a video from a text prompt with Wan2.2 T2V (reference behaviour).

Same flags and defaults as the reference `generate.py`. Additions:
`--random_init` (every component with deterministic random weights, no checkpoint), the tiny
`t2v-tiny` task, `--debug`, and errors that come before any work: every input is checked
(wan/utils/validation.py) before a model is built -- missing or damaged checkpoint files,
bad solver settings, an output path or encoder that cannot take the video, a machine that
cannot hold the task. Errors print as one `error: ...` line (the traceback with --debug) and
exit 1. The save is atomic; if it fails, the frames are kept in NAME.frames.npy.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from datetime import datetime

from wan.utils.validation import OTHER_TASK_FLAGS, USER_ERRORS, UserError  # noqa: F401

EXAMPLE_PROMPT = {
    't2v-A14B': 'Two anthropomorphic cats in comfy boxing gear and bright gloves fight '
                'intensely on a spotlighted stage.',
}
EXAMPLE_PROMPT['t2v-tiny'] = EXAMPLE_PROMPT['t2v-A14B']



def add_reference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The reference CLI's flags with the same names, types and defaults."""
    from wan.text2video import SOLVERS
    from wan.configs import WAN_CONFIGS
    from wan.utils.utils import str2bool
    from wan.utils.validation import cli_size_choices
    parser.add_argument('--task', type=str, default='t2v-A14B', choices=list(WAN_CONFIGS),
                        help='The task to run.')
    parser.add_argument('--size', type=str, default=None, choices=cli_size_choices(),
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
    parser.add_argument('--sample_solver', type=str, default='unipc', choices=list(SOLVERS),
                        help='The solver used to sample (euler: flow-matching Euler, for '
                             'few-step distilled LoRAs; this project\'s addition).')
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
    parser.add_argument('--debug', action='store_true', default=False,
                        help='Debug logging, and the full traceback of an error (otherwise '
                             'one "error: ..." line).')
    g = parser.add_argument_group('checkpoints, LoRAs and presets (this project\'s additions)')
    g.add_argument('--lora', action='append', default=[], type=_lora_arg,
                   metavar='PATH[:STRENGTH]',
                   help='A LoRA for both experts, merged into the weights as they load '
                        '(repeatable; strength 1.0 by default).')
    g.add_argument('--lora_high', action='append', default=[], type=_lora_arg,
                   metavar='PATH[:STRENGTH]', help='A LoRA for the high-noise expert only.')
    g.add_argument('--lora_low', action='append', default=[], type=_lora_arg,
                   metavar='PATH[:STRENGTH]', help='A LoRA for the low-noise expert only.')
    g.add_argument('--high_noise_file', default=None,
                   help='The high-noise expert as one file or folder (e.g. ComfyUI\'s '
                        'wan2.2_t2v_high_noise_14B_fp16.safetensors) instead of --ckpt_dir\'s.')
    g.add_argument('--low_noise_file', default=None,
                   help='The low-noise expert likewise.')
    from wan.configs.presets import PRESETS
    g.add_argument('--preset', default=None, choices=sorted(PRESETS),
                   help='Sampling settings of a known recipe for the options left at their '
                        'defaults (lightning: the 4-step Wan2.2-Lightning LoRAs: Euler, '
                        '4 steps, shift 5, guidance 1.0; give its LoRAs with --lora_high/'
                        '--lora_low).')
    return parser


def _lora_arg(text: str):
    """argparse type of --lora*: PATH or PATH:STRENGTH (the file is read later, before any
    model is built)."""
    from wan.utils.lora import parse_lora_arg
    try:
        return parse_lora_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Generate a video from a text prompt with Wan2.2 (reference path).')
    return add_reference_args(parser)


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Fill defaults from the config, then check every input (wan/utils/validation.py)
    before anything is built: a bad run stops here, in one line."""
    from wan.configs import WAN_CONFIGS, default_size
    from wan.utils.validation import check_cli_args, check_task
    check_task(args.task)
    cfg = WAN_CONFIGS[args.task]
    apply_preset(args, cfg)
    if args.size is None:
        args.size = default_size(args.task)
    if args.sample_steps is None:
        args.sample_steps = cfg.sample_steps
    if args.sample_shift is None:
        args.sample_shift = cfg.sample_shift
    if args.sample_guide_scale is None:
        args.sample_guide_scale = cfg.sample_guide_scale
    if args.frame_num is None:
        args.frame_num = cfg.frame_num
    if args.prompt is None:
        args.prompt = EXAMPLE_PROMPT[args.task]
    if args.save_file is None:
        args.save_file = default_save_file(args)
    check_cli_args(args, world_size)


def apply_preset(args: argparse.Namespace, cfg) -> None:
    """--preset: the recipe's settings for every option still at its default (explicit flags
    win); its boundary replaces the task's."""
    if getattr(args, 'preset', None) is None:
        return
    from wan.configs.presets import PRESETS
    recipe = PRESETS[args.preset]
    defaults = {'sample_solver': 'unipc'}
    for key in ('sample_solver', 'sample_steps', 'sample_shift', 'sample_guide_scale'):
        if key in recipe and getattr(args, key) == defaults.get(key):
            setattr(args, key, recipe[key])
    args.boundary = recipe.get('boundary', cfg.boundary)
    logging.info('preset %s: solver %s, %d steps, shift %s, guidance %s, boundary %s',
                 args.preset, args.sample_solver, args.sample_steps, args.sample_shift,
                 args.sample_guide_scale, args.boundary)


def default_save_file(args: argparse.Namespace) -> str:
    formatted_time = datetime.now().strftime('%Y%m%d_%H%M%S')
    formatted_prompt = args.prompt.replace(' ', '_').replace('/', '_')[:50]
    size = args.size.replace('*', 'x') if sys.platform == 'win32' else args.size
    return f'{args.task}_{size}_{args.ulysses_size}_{formatted_prompt}_{formatted_time}.mp4'


def init_logging(rank: int, debug: bool = False) -> None:
    if rank == 0:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stdout,
                            force=True, format='[%(asctime)s] %(levelname)s: %(message)s')
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
    """Write the video atomically (wan.utils.utils.write_video_frames): on failure nothing is
    left at --save_file, the frames are kept in NAME.frames.npy, and VideoSaveError (or
    VideoSaveInterrupted for Ctrl-C) says where."""
    from wan.utils.utils import video_to_uint8_frames, write_video_frames
    logging.info('Saving generated video to %s', args.save_file)
    frames = video_to_uint8_frames(video[None], nrow=1, normalize=True, value_range=(-1, 1))
    write_video_frames(frames, args.save_file, fps)


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
    pipe = cls(config=cfg, checkpoint_dir=args.ckpt_dir, device_id=local_rank, rank=rank,
               t5_fsdp=args.t5_fsdp, dit_fsdp=args.dit_fsdp, use_sp=(args.ulysses_size > 1),
               t5_cpu=args.t5_cpu, convert_model_dtype=args.convert_model_dtype,
               random_init=args.random_init, random_init_seed=args.random_init_seed,
               cfg_parallel=getattr(args, 'cfg_parallel', False),
               ulysses_size=args.ulysses_size, loras=args.lora, loras_high=args.lora_high,
               loras_low=args.lora_low, high_noise_file=args.high_noise_file,
               low_noise_file=args.low_noise_file, **extra)
    if getattr(args, 'boundary', None) is not None:  # a --preset's
        pipe.boundary = args.boundary
    return pipe


def generate(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from wan.configs import WAN_CONFIGS
    from wan.distributed.util import agree_on_seed

    rank, world_size, local_rank = init_distributed(args)
    init_logging(rank, args.debug)
    if args.offload_model is None:
        args.offload_model = world_size == 1
        logging.info('offload_model is not specified, set to %s.', args.offload_model)
    validate_args(args, world_size)
    # the one seed rule: a negative seed draws one (rank 0's under torchrun), ranks agree
    args.base_seed = agree_on_seed(args.base_seed)
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


def report_error(exc: BaseException, debug: bool = False, text: str = '') -> None:
    """One `error: ...` line on stderr (the whole message also in the log); the traceback
    is logged at debug level, i.e. shown with --debug."""
    text = (text or str(exc)).strip() or type(exc).__name__
    lines = text.splitlines()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stdout,
                            format='[%(asctime)s] %(levelname)s: %(message)s')
    logging.error('%s', text)
    logging.debug('traceback', exc_info=exc)
    print(f'error: {lines[0]}' + (' ...' if len(lines) > 1 else ''), file=sys.stderr)


def main(argv=None, run=generate, parser=None) -> int:
    """Run the CLI; 0 on success, 1 on an error the user can act on, 130 on Ctrl-C."""
    warnings.filterwarnings('ignore')
    args = (parser or _parser()).parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as exc:
        report_error(exc, args.debug)
        return 1
    except KeyboardInterrupt as exc:
        # a VideoSaveInterrupted says where the frames are; a bare Ctrl-C says nothing
        report_error(exc, args.debug, str(exc) or 'interrupted')
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
