"""Every check of a run's inputs, in one place, made before anything is loaded.

Both CLIs (generate.py, generate_optimized.py) call `check_cli_args` once their defaults are
filled in; `WanT2V.generate` calls `check_generation_args` at its top. Each check raises
`UserError` (a ValueError) with one line that names the flag or argument, the value and what
would be valid; missing checkpoint files raise FileNotFoundError and damaged ones
CheckpointError. `USER_ERRORS` lists the errors a user can act on: the CLIs print them as one
`error: ...` line (the traceback only with --debug).
"""
from __future__ import annotations

import argparse
import logging
import math
import operator
import os
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError, check_checkpoint_dir
from .memory_plan import PlacementError
from .utils import VideoSaveError, VideoTargetError, check_video_target

__all__ = [
    'UserError', 'USER_ERRORS', 'API_NAMES', 'CLI_NAMES', 'OTHER_TASK_FLAGS', 'SUPPORTED_TASKS',
    'MAX_SEED', 'cli_size_choices', 'nearest_valid_frames', 'check_task', 'check_task_size',
    'check_frame_num', 'check_seed', 'check_shift', 'check_schedule', 'check_size',
    'check_generation_args', 'check_attention_backend', 'check_gpu_memory_cap', 'check_output',
    'estimate_model_bytes',
    'host_memory_bytes', 'check_device_fits', 'check_parallel_layout', 'check_cli_args',
]

GiB = 2**30
# torch.Generator.manual_seed and the int64 seed broadcast of multi-GPU runs
MAX_SEED = 2**63 - 1
SUPPORTED_TASKS = ('t2v-A14B', 't2v-tiny')

# Flags of the reference's other tasks and prompt-extension backends, with their defaults:
# they parse, and using one is an error here.
OTHER_TASK_FLAGS = {
    'image': None, 'audio': None, 'enable_tts': False, 'tts_prompt_audio': None,
    'tts_prompt_text': None, 'tts_text': None, 'pose_video': None, 'num_clip': None,
    'start_from_ref': False, 'infer_frames': 80, 'src_root_path': None, 'refert_num': 77,
    'replace_flag': False, 'use_relighting_lora': False, 'use_prompt_extend': False,
}

# How the generation arguments are called in the Python API and on the command line.
API_NAMES = dict(shift='shift', steps='sampling_steps', solver='sample_solver', seed='seed',
                 frame_num='frame_num', size='size')
CLI_NAMES = dict(shift='--sample_shift', steps='--sample_steps', solver='--sample_solver',
                 seed='--base_seed', frame_num='--frame_num', size='--size')


class UserError(ValueError):
    """Bad input the user can fix: reported by the CLIs as one `error:` line, exit status 1."""


# Errors a user can act on (bad input, missing or damaged files, a failed save, a run that
# does not fit in GPU and host memory).
USER_ERRORS = (UserError, FileNotFoundError, CheckpointError, VideoSaveError, VideoTargetError,
               PlacementError)


# ------------------------------------------------------------------------------ tasks, sizes
def cli_size_choices() -> list:
    """The `--size` values some supported task accepts (each task then checks its own)."""
    from wan.configs import SUPPORTED_SIZES
    return list(dict.fromkeys(s for task in SUPPORTED_TASKS for s in SUPPORTED_SIZES[task]))


def check_task(task: str) -> None:
    if task not in SUPPORTED_TASKS:
        raise UserError(f'task {task!r} is not supported by this project (text-to-video only: '
                        f'{", ".join(SUPPORTED_TASKS)})')


def check_task_size(task: str, size: str) -> None:
    from wan.configs import SUPPORTED_SIZES
    if size not in SUPPORTED_SIZES[task]:
        raise UserError(f'unsupported size {size!r} for task {task}; supported sizes: '
                        f'{", ".join(SUPPORTED_SIZES[task])}')


# ------------------------------------------------------------------------------ generation
def _as_int(value) -> Optional[int]:
    """`value` as an int if it is an integer (numpy ones included, bool not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def nearest_valid_frames(n: int) -> str:
    """The valid frame counts (4k+1, k >= 0) next to `n`, e.g. '9 or 13' for 10."""
    if n < 1:
        return '1'
    lo = ((n - 1) // 4) * 4 + 1
    return f'{lo} or {lo + 4}' if lo != n else str(n)


def check_frame_num(frame_num: int, name: str = 'frame_num') -> None:
    n = _as_int(frame_num)
    if n is None or n < 1 or (n - 1) % 4 != 0:
        nearest = f', nearest valid: {nearest_valid_frames(n)}' if n is not None else ''
        raise UserError(f'{name} must be a positive count of the form 4n+1 (1, 5, 9, ..., 81); '
                        f'got {frame_num}{nearest}')


def check_seed(seed: int, name: str = 'seed') -> None:
    """A negative seed means "random"; others must fit the generator (0 .. 2**63-1)."""
    n = _as_int(seed)
    if n is None or n > MAX_SEED:
        raise UserError(f'{name} must be an integer from 0 to 2**63-1 = {MAX_SEED} (or -1 for '
                        f'a random seed); got {seed}')


def check_shift(shift: float, name: str = 'shift') -> None:
    try:
        ok = math.isfinite(float(shift)) and float(shift) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f'{name} must be a finite number > 0 (the flow-matching shift; '
                        f'12.0 for t2v-A14B); got {shift}')


def _timesteps(sample_solver: str, steps: int, shift: float, num_train_timesteps: int):
    """The solver's integer timesteps, computed on the CPU as generate() will (or the
    ValueError the solver raises for them)."""
    from wan.text2video import WanT2V
    return WanT2V.make_scheduler(sample_solver, steps, shift, 'cpu', num_train_timesteps)[1]


def _has_repeats(sample_solver: str, steps: int, shift: float, num_train_timesteps: int) -> bool:
    try:
        t = _timesteps(sample_solver, steps, shift, num_train_timesteps)
    except ValueError:  # the solver refuses a schedule with a repeated first timestep
        return True
    return len(torch.unique(t)) != len(t)


def check_schedule(sample_solver: str, sampling_steps: int, shift: float,
                   num_train_timesteps: int = 1000,
                   names: Mapping[str, str] = API_NAMES) -> None:
    """steps >= 1, and the solver's timestep list for these steps and shift has no repeated
    timestep (at shift 12, UniPC repeats one from 89 steps on: the reference then runs past
    the end of its schedule). An unknown solver raises the solver's NotImplementedError."""
    if _as_int(sampling_steps) is None or sampling_steps < 1:
        raise UserError(f'{names["steps"]} must be an integer >= 1; got {sampling_steps}')
    check_shift(shift, names['shift'])
    if not _has_repeats(sample_solver, sampling_steps, shift, num_train_timesteps):
        return
    # the largest step count that works at this shift (repeats only grow with the steps)
    lo, hi = 1, min(sampling_steps - 1, num_train_timesteps)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _has_repeats(sample_solver, mid, shift, num_train_timesteps):
            hi = mid - 1
        else:
            lo = mid
    raise UserError(f'{names["steps"]} {sampling_steps} at {names["shift"]} {shift:g} gives '
                    f'repeated timesteps with the {sample_solver} solver; use at most {lo} '
                    f'steps at this shift, or a smaller shift')


def check_size(size: Tuple[int, int], multiple: Tuple[int, int] = (16, 16),
               name: str = 'size') -> None:
    """(W, H), each a positive multiple of the latent stride times the patch size."""
    ok = (isinstance(size, (tuple, list)) and len(size) == 2
          and all(_as_int(v) is not None and v > 0 for v in size))
    if not ok or size[0] % multiple[0] or size[1] % multiple[1]:
        raise UserError(f'{name} must be (width, height) with the width a positive multiple of '
                        f'{multiple[0]} and the height of {multiple[1]}; got {size}')


def check_generation_args(*, size: Optional[Tuple[int, int]], frame_num: int, shift: float,
                          sample_solver: str, sampling_steps: int, seed: int,
                          num_train_timesteps: int = 1000,
                          size_multiple: Tuple[int, int] = (16, 16),
                          names: Mapping[str, str] = API_NAMES) -> None:
    """The checks of one generate() call (size=None: already checked by the caller)."""
    if size is not None:
        check_size(size, size_multiple, names['size'])
    check_frame_num(frame_num, names['frame_num'])
    check_seed(seed, names['seed'])
    check_schedule(sample_solver, sampling_steps, shift, num_train_timesteps, names)


# ------------------------------------------------------------------------------ machine
def check_gpu_memory_cap(cap_gib: float, device: Union[str, torch.device]) -> None:
    """--gpu_memory_gib: positive, no larger than the GPU, and only with a GPU."""
    from .placement import check_gpu_cap
    device = torch.device(device)
    if device.type != 'cuda':
        raise UserError(f'--gpu_memory_gib {cap_gib} needs a CUDA GPU; this run is on {device}')
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        check_gpu_cap(cap_gib, total, torch.cuda.get_device_name(device))
    except ValueError as exc:
        raise UserError(f'--gpu_memory_gib: {exc}') from None


def check_attention_backend(name: str, device: Union[str, torch.device],
                            flag: str = '--attention') -> str:
    """The backend `name` resolves to on `device`; UserError if it cannot run there."""
    from wan.modules.attention import available_backends, resolve_backend
    try:
        return resolve_backend(name, device)
    except (RuntimeError, ValueError) as exc:
        on_cuda = torch.device(device).type == 'cuda'
        usable = ['auto', 'reference'] + (available_backends() if on_cuda else ['sdpa'])
        raise UserError(f'{flag} {name} cannot run on this machine ({exc}); usable here: '
                        f'{", ".join(usable)}') from exc


def check_output(path: str, flag: str = '--save_file') -> None:
    """The video target is writable and its container and encoder usable (a small probe file
    is created and removed in its folder)."""
    try:
        check_video_target(path, probe=True)
    except (FileNotFoundError, VideoTargetError) as exc:
        raise UserError(f'{flag}: {exc}') from exc


def estimate_model_bytes(config, on_cuda: bool = False,
                         convert_model_dtype: bool = False) -> Dict[str, int]:
    """Bytes of each model's weights as the pipeline stores them, from the config (models
    built on the meta device, nothing allocated): 'low_noise_model', 'high_noise_model' (fp32,
    or the config's param_dtype with convert_model_dtype on a GPU), 't5' (t5_dtype), 'vae'
    (fp32)."""
    from wan.modules.model import WanModel
    from wan.modules.t5 import umt5_xxl
    from wan.modules.vae2_1 import _video_vae
    from wan.text2video import T5_ARCH_KEYS
    from .random_init import build_on_meta

    def count(module: torch.nn.Module) -> int:
        return sum(t.numel() for t in module.state_dict().values())

    dit_keys = ('patch_size', 'text_len', 'dim', 'ffn_dim', 'freq_dim', 'num_heads',
                'num_layers', 'window_size', 'qk_norm', 'cross_attn_norm', 'eps', 'text_dim')
    dit = build_on_meta(lambda: WanModel(**{k: config[k] for k in dit_keys if k in config}))
    expert_dtype = config.param_dtype if convert_model_dtype and on_cuda else torch.float32
    expert = count(dit) * torch.finfo(expert_dtype).bits // 8
    t5_arch = {v: config[k] for k, v in T5_ARCH_KEYS.items() if k in config}
    t5 = build_on_meta(lambda: umt5_xxl(encoder_only=True, dtype=config.t5_dtype, **t5_arch))
    vae = build_on_meta(lambda: _video_vae(z_dim=16, dim=config.get('vae_dim', 96)))
    return {'low_noise_model': expert, 'high_noise_model': expert,
            't5': count(t5) * torch.finfo(config.t5_dtype).bits // 8, 'vae': count(vae) * 4}


def host_memory_bytes() -> int:
    """Physical memory of this machine, or the container's memory limit when lower."""
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    for limit_file in ('/sys/fs/cgroup/memory.max',
                       '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_device_fits(config, task: str, device: Union[str, torch.device],
                      host_memory: Optional[int] = None) -> None:
    """On a CPU, refuse a task whose weights alone exceed this machine's memory (t2v-A14B:
    two fp32 experts of ~57 GB and an ~11 GB T5), naming what it needs and what to use
    instead. On a GPU the placement (offload, memory plan) decides."""
    if torch.device(device).type != 'cpu':
        return
    sizes = estimate_model_bytes(config, on_cuda=False)
    need = sum(sizes.values())
    have = host_memory if host_memory is not None else host_memory_bytes()
    if need <= have:
        return
    raise UserError(
        f'task {task} cannot run on this machine: no CUDA GPU, and on the CPU its weights '
        f'alone need {need / GiB:.0f} GiB (two experts of {sizes["low_noise_model"] / GiB:.1f} '
        f'GiB each in fp32, T5 {sizes["t5"] / GiB:.1f} GiB, VAE {sizes["vae"] / GiB:.1f} GiB) '
        f'while this machine has {have / GiB:.0f} GiB; run it on a CUDA GPU, or use '
        f'--task t2v-tiny on a CPU')


# ------------------------------------------------------------------------------ the CLIs
def check_parallel_layout(args: argparse.Namespace, world_size: int, num_heads: int) -> None:
    """The layout rule (`parallel_layout`) and the flags that need several processes, as
    pure argument checks: identical on every rank and before any collective, so that a bad
    combination exits on every rank instead of hanging."""
    from wan.distributed.cfg_parallel import parallel_layout
    from wan.distributed.sequence_parallel import check_sp_heads
    cfg_parallel = getattr(args, 'cfg_parallel', False)
    replicas = getattr(args, 'data_parallel', 1)
    if world_size == 1:
        if args.t5_fsdp or args.dit_fsdp:
            raise UserError('--t5_fsdp/--dit_fsdp need a distributed launch (torchrun with '
                            'more than one process)')
        if args.ulysses_size > 1:
            raise UserError('--ulysses_size > 1 needs a distributed launch (torchrun '
                            '--nproc_per_node=N)')
    try:
        if replicas < 1 or world_size % replicas:
            raise ValueError(f'{replicas} pipeline replicas do not divide the world')
        _, ulysses = parallel_layout(world_size // replicas, args.ulysses_size, cfg_parallel)
        check_sp_heads(num_heads, ulysses)
    except ValueError as exc:
        raise UserError(f'--ulysses_size {args.ulysses_size}'
                        f'{" --cfg_parallel" if cfg_parallel else ""} on {world_size} '
                        f'process(es): {exc}') from None


def check_cli_args(args: argparse.Namespace, world_size: int,
                   device: Optional[Union[str, torch.device]] = None) -> None:
    """Every check of a CLI run (defaults already filled in), cheapest first; nothing is
    built or loaded. `device` defaults to this process's GPU, or the CPU without CUDA."""
    from wan.configs import WAN_CONFIGS
    check_task(args.task)
    for name, default in OTHER_TASK_FLAGS.items():
        if getattr(args, name, default) != default:
            raise UserError(f"--{name} is not supported by this project (it belongs to the "
                            f"reference's other tasks or prompt-extension backends)")
    cfg = WAN_CONFIGS[args.task]
    if args.ckpt_dir is None and not args.random_init:
        raise UserError('--ckpt_dir is required (or --random_init for random weights)')
    if args.ckpt_dir is not None and not args.random_init and not os.path.isdir(args.ckpt_dir):
        raise UserError(f'checkpoint directory not found: {args.ckpt_dir} '
                        f'(looked for {os.path.abspath(args.ckpt_dir)})')
    check_task_size(args.task, args.size)
    check_generation_args(size=None, frame_num=args.frame_num, shift=args.sample_shift,
                          sample_solver=args.sample_solver, sampling_steps=args.sample_steps,
                          seed=args.base_seed, num_train_timesteps=cfg.num_train_timesteps,
                          names=CLI_NAMES)
    if not args.prompt.strip():
        raise UserError('--prompt is empty; give a text prompt')
    check_parallel_layout(args, world_size, cfg.num_heads)
    if device is None:
        device = torch.device('cuda', int(os.getenv('LOCAL_RANK', 0))) \
            if torch.cuda.is_available() else torch.device('cpu')
    if getattr(args, 'attention', None) is not None:
        check_attention_backend(args.attention, device)
    if getattr(args, 'gpu_memory_gib', None) is not None:
        check_gpu_memory_cap(args.gpu_memory_gib, device)
    check_output(args.save_file)
    check_device_fits(cfg, args.task, device)
    if not args.random_init:
        check_checkpoint_dir(cfg, args.ckpt_dir)
    logging.debug('arguments checked: %s', args)
