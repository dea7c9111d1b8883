"""How much GPU and host memory the pipeline may use: the inputs of the memory planner.

- `usable_gpu_bytes(device, cap_gib)`: free GPU memory, counting the blocks the caching
  allocator holds but does not use, limited by a `gpu_memory_gib` cap;
- `apply_gpu_cap(device, cap_gib)`: enforce that cap on the caching allocator (a smaller GPU
  emulated on a large one, or a GPU shared with other work);
- `usable_host_bytes()`: available host memory, limited by the process's cgroup (a container's
  memory limit is what the out-of-memory killer enforces, not the machine's RAM).

The file paths are arguments so that the host side is testable with fake files.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Union

import torch

__all__ = ['usable_gpu_bytes', 'apply_gpu_cap', 'check_gpu_cap', 'usable_host_bytes',
           'read_meminfo', 'cgroup_headroom_bytes']

GiB = 2**30
# cgroup v1 reports "no limit" as the largest page-aligned 63-bit number
_UNLIMITED = 2**62


def check_gpu_cap(cap_gib: float, total_bytes: Optional[int] = None,
                  device_name: str = 'the GPU') -> int:
    """A `gpu_memory_gib` cap in bytes; ValueError when it is not positive or (given the GPU's
    `total_bytes`) larger than the GPU."""
    if not cap_gib > 0:
        raise ValueError(f'gpu_memory_gib must be a positive number of GiB, got {cap_gib}')
    cap = int(cap_gib * GiB)
    if total_bytes is not None and cap > total_bytes:
        raise ValueError(f'gpu_memory_gib {cap_gib} exceeds the {total_bytes / GiB:.1f} GiB of '
                         f'{device_name}; valid: 0 < gpu_memory_gib <= '
                         f'{total_bytes / GiB:.1f}')
    return cap


def usable_gpu_bytes(device: Union[torch.device, str, int],
                     cap_gib: Optional[float] = None) -> int:
    """GPU bytes this process can still allocate on `device`: free memory plus the blocks the
    caching allocator reserved but does not use, and no more than `cap_gib` minus what this
    process has allocated. (Add the bytes of our own models already on the GPU to get the
    planner's budget.)"""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    usable = free + torch.cuda.memory_reserved(device) - allocated
    if cap_gib is not None:
        usable = min(usable, check_gpu_cap(cap_gib, total, str(device)) - allocated)
    return max(int(usable), 0)


def apply_gpu_cap(device: Union[torch.device, str, int],
                  cap_gib: Optional[float]) -> Optional[float]:
    """Limit the caching allocator on `device` to `cap_gib` GiB (reserved memory, weights and
    activations alike; the CUDA context is outside it); returns the fraction set, None without
    a cap. Allocations beyond the cap raise torch.cuda.OutOfMemoryError."""
    if cap_gib is None:
        return None
    check_gpu_cap(cap_gib)  # before touching CUDA
    device = torch.device(device) if not isinstance(device, int) else torch.device('cuda', device)
    if device.index is None:  # set_per_process_memory_fraction wants an index
        device = torch.device('cuda', torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    cap = check_gpu_cap(cap_gib, total, str(device))
    fraction = cap / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    if cap > free + torch.cuda.memory_reserved(device):
        logging.warning('gpu_memory_gib %.1f is more than the %.1f GiB free on %s: other '
                        'processes use the rest', cap_gib, free / GiB, device)
    logging.info('GPU memory capped at %.1f GiB of %.1f GiB on %s', cap_gib, total / GiB, device)
    return fraction


# ---------------------------------------------------------------------------------------------
# host
# ---------------------------------------------------------------------------------------------

def read_meminfo(path: str = '/proc/meminfo') -> Dict[str, int]:
    """/proc/meminfo as bytes per key."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(':')
            fields = rest.split()
            if not fields:
                continue
            value = int(fields[0])
            out[key.strip()] = value * 1024 if fields[1:] == ['kB'] else value
    return out


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == 'max':
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: str) -> Dict[str, int]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(' ')
                if value.strip().isdigit():
                    out[key] = int(value)
    except OSError:
        pass
    return out


def _cgroup_paths(proc_cgroup: str) -> Dict[str, str]:
    """controller ('' for cgroup v2) -> this process's cgroup path."""
    paths = {}
    try:
        with open(proc_cgroup) as f:
            for line in f:
                parts = line.strip().split(':', 2)
                if len(parts) == 3:
                    for controller in parts[1].split(','):
                        paths[controller] = parts[2]
    except OSError:
        pass
    return paths


def _own_dir(root: str, relative: str) -> str:
    """The cgroup folder of this process, or `root` when the namespace hides the path."""
    candidate = os.path.join(root, relative.lstrip('/'))
    return candidate if relative and os.path.isdir(candidate) else root


def cgroup_headroom_bytes(cgroup_root: str = '/sys/fs/cgroup',
                          proc_cgroup: str = '/proc/self/cgroup') -> Optional[int]:
    """Bytes the process's cgroup may still use (limit minus usage, reclaimable page cache
    counted as free), the tightest over v2 ancestors; None without a memory limit."""
    paths = _cgroup_paths(proc_cgroup)
    headrooms = []
    v1_root = os.path.join(cgroup_root, 'memory')
    if os.path.exists(os.path.join(cgroup_root, 'cgroup.controllers')):  # v2 (unified)
        root = os.path.normpath(cgroup_root)
        folder = os.path.normpath(_own_dir(root, paths.get('', '')))
        while True:
            limit = _read_int(os.path.join(folder, 'memory.max'))
            if limit is not None:
                usage = _read_int(os.path.join(folder, 'memory.current')) or 0
                inactive = _read_stat(os.path.join(folder, 'memory.stat')).get('inactive_file', 0)
                headrooms.append(limit - (usage - inactive))
            if folder == root or not folder.startswith(root + os.sep):
                break
            folder = os.path.dirname(folder)
    elif os.path.isdir(v1_root):
        folder = _own_dir(v1_root, paths.get('memory', ''))
        stat = _read_stat(os.path.join(folder, 'memory.stat'))
        limits = [v for v in (_read_int(os.path.join(folder, 'memory.limit_in_bytes')),
                              stat.get('hierarchical_memory_limit')) if v is not None]
        limit = min(limits) if limits else None
        if limit is not None and limit < _UNLIMITED:
            usage = _read_int(os.path.join(folder, 'memory.usage_in_bytes')) or 0
            headrooms.append(limit - (usage - stat.get('total_inactive_file', 0)))
    return max(min(headrooms), 0) if headrooms else None


def usable_host_bytes(meminfo: str = '/proc/meminfo', cgroup_root: str = '/sys/fs/cgroup',
                      proc_cgroup: str = '/proc/self/cgroup') -> int:
    """Host memory available to this process: MemAvailable (or, on kernels without it, free +
    page cache), limited by the cgroup's headroom; without /proc, the free physical pages."""
    try:
        info = read_meminfo(meminfo)
    except OSError:
        info = {}
    if 'MemAvailable' in info:
        available = info['MemAvailable']
    elif 'MemFree' in info:
        available = info['MemFree'] + info.get('Buffers', 0) + info.get('Cached', 0)
    else:
        available = _sysconf_available()
    headroom = cgroup_headroom_bytes(cgroup_root, proc_cgroup)
    return min(available, headroom) if headroom is not None else available


def _sysconf_available() -> int:
    page = os.sysconf('SC_PAGE_SIZE')
    for name in ('SC_AVPHYS_PAGES', 'SC_PHYS_PAGES'):
        if name in os.sysconf_names:
            return os.sysconf(name) * page
    raise RuntimeError('cannot tell the available host memory: no /proc/meminfo and no '
                       'sysconf page counts')
