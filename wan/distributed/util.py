"""Small torch.distributed helpers shared by the pipelines and the CLIs."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ['get_world_size', 'get_rank', 'broadcast_seed', 'all_to_all', 'all_gather']


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed on every rank (a random -1 seed is drawn on each rank first)."""
    if not _initialized():
        return seed
    device = torch.device('cuda', torch.cuda.current_device()) \
        if dist.get_backend() == 'nccl' else torch.device('cpu')
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())
