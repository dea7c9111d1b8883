"""Checks of a benchmark or report request, made before anything is built.

Each raises `RequestError` (a ValueError) with a one-line message naming the flag and the
valid values; the command lines print it as `error: ...` and exit.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

__all__ = ['RequestError', 'check_request', 'check_device_holds', 'expert_host_bytes',
           'available_host_bytes']

GiB = 2**30


class RequestError(ValueError):
    """A request this machine or this project cannot run; the message says what to change."""


def check_request(task: str, size: Optional[str], frame_num: Optional[int]
                  ) -> Tuple[object, str, int]:
    """(config, size, frame_num) for a t2v request, defaults from the task's config."""
    from wan.configs import SUPPORTED_SIZES, UNSUPPORTED_TASKS, WAN_CONFIGS, default_size
    supported = [t for t in WAN_CONFIGS if t not in UNSUPPORTED_TASKS]
    if task in UNSUPPORTED_TASKS:
        raise RequestError(f'--task {task} is not supported by this project (text-to-video '
                           f'only: {", ".join(supported)})')
    if task not in WAN_CONFIGS:
        raise RequestError(f'unknown --task {task!r}; valid: {", ".join(supported)}')
    cfg = WAN_CONFIGS[task]
    size = size or default_size(task)
    if size not in SUPPORTED_SIZES[task]:
        raise RequestError(f'--size {size} is not supported by {task}; valid: '
                           f'{", ".join(SUPPORTED_SIZES[task])}')
    frame_num = cfg.frame_num if frame_num is None else frame_num
    if frame_num < 1 or (frame_num - 1) % 4:
        lo = max(1, (frame_num - 1) // 4 * 4 + 1)
        raise RequestError(f'--frame_num must be a positive 4n+1 (1, 5, 9, ..., 81); got '
                           f'{frame_num}, nearest valid: '
                           + (f'{lo} or {lo + 4}' if frame_num > 1 else '1'))
    return cfg, size, frame_num


def expert_host_bytes(cfg) -> int:
    """Bytes of the two experts as the CPU pipeline holds them: fp32 (the CPU has no fp32
    autocast islands, so convert_model_dtype does not apply there)."""
    from wan.utils.memory_plan import dit_param_count
    params = dit_param_count(cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.freq_dim,
                             cfg.get('text_dim', 4096))
    return 2 * params * 4


def available_host_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def check_device_holds(task: str, cfg, device: torch.device) -> None:
    """Refuse a task whose experts alone exceed this CPU machine's available memory."""
    if device.type != 'cpu':
        return  # GPU placement is the memory planner's decision
    need = expert_host_bytes(cfg)
    have = available_host_bytes()
    if have is not None and need > have:
        raise RequestError(
            f'--task {task} on the CPU needs at least {need / GiB:.0f} GiB of memory for its '
            f'two experts in fp32 (this machine has {have / GiB:.0f} GiB available); use '
            f'--task t2v-tiny on the CPU, or run {task} on a GPU')
