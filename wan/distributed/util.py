"""Small torch.distributed helpers shared by the pipelines and the CLIs."""
from __future__ import annotations

import random
import sys

import torch
import torch.distributed as dist

__all__ = ['get_world_size', 'get_rank', 'agree_on_seed']


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def _collective_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) \
        if dist.get_backend() == 'nccl' else torch.device('cpu')


def agree_on_seed(seed: int, group=None) -> int:
    """The seed to use: the one place that decides it (the CLIs and WanT2V.generate call it).

    A negative seed means "random": one is drawn (rank 0's under torchrun). With a process
    group, ValueError on every rank when the ranks were given different seeds. `group`: the
    ranks that must agree (default: the world; a pipeline replica's group under data
    parallelism).

    One all_gather of (seed, random draw) from every rank, so all ranks see the same facts and
    either all raise or all return the same value (no rank left waiting). A negative seed on
    every rank means "random": rank 0's draw is used.
    """
    if not _initialized():
        return seed if seed >= 0 else random.randint(0, sys.maxsize)
    draw = random.randint(0, sys.maxsize) if seed < 0 else 0
    mine = torch.tensor([max(seed, -1), draw], dtype=torch.int64, device=_collective_device())
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    seeds = [int(p[0]) for p in parts]
    if len(set(seeds)) != 1:
        raise ValueError(f'the ranks were given different seeds {seeds} (rank order); every '
                         f'rank must use the same seed so that all draw the same noise '
                         f'(generate.py broadcasts rank 0\'s --base_seed)')
    return seeds[0] if seeds[0] >= 0 else int(parts[0][1])
