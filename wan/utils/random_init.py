"""Deterministic random weights for every model (`--random_init`), checkpoint-free.

Models are built on the meta device, materialised with `to_empty` directly on the target
device (an A14B expert never touches host memory) and filled from one seeded generator in
state-dict order. The values follow the scale of a trained network closely enough for the
activations to stay finite and the video to be non-trivial; speed does not depend on them.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ['init_random_weights_', 'build_on_meta']


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating its weights."""
    with torch.device('meta'):
        return factory()


@torch.no_grad()
def init_random_weights_(module: nn.Module, seed: int, device: torch.device | str = 'cpu',
                         dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Materialise `module` on `device` (from meta if needed) and fill it deterministically.

    Rules by name: norm scales ('norm', 'gamma') are ones; 'modulation' tables are
    randn/sqrt(dim); other tensors with >= 2 dims are normal(0, 1/sqrt(fan_in)); 1-D biases
    are normal(0, 0.02). Same seed, device and dtype give the same weights.
    """
    device = torch.device(device)
    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        module.to_empty(device=device)
    else:
        module.to(device)
    if dtype is not None:
        module.to(dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        owner, _, leaf = name.rpartition('.')
        if leaf == 'gamma' or (leaf == 'weight' and owner.rpartition('.')[2].startswith('norm')):
            t.fill_(1.0)
        elif leaf == 'modulation':
            _normal_(t, 1.0 / math.sqrt(t.shape[-1]), gen)
        elif t.dim() >= 2:
            _normal_(t, 1.0 / math.sqrt(max(1, t[0].numel())), gen)
        else:
            _normal_(t, 0.02, gen)
    return module


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    # Sample in fp32 so that the values do not depend on the storage dtype's RNG path.
    if t.dtype == torch.float32:
        t.normal_(0.0, std, generator=gen)
    else:
        t.copy_(torch.empty(t.shape, device=t.device, dtype=torch.float32).normal_(
            0.0, std, generator=gen))
