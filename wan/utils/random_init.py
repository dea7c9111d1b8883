"""Deterministic random weights for every model (`--random_init`), checkpoint-free.

Models are built on the meta device, materialised with `to_empty` directly on the target
device (an A14B expert never touches host memory) and filled from one seeded generator in
state-dict order. The values follow the scale of a trained network closely enough for the
activations to stay finite and the video to be non-trivial; speed does not depend on them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import nn

__all__ = ['init_random_weights_', 'random_tensors', 'build_on_meta']


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating its weights."""
    with torch.device('meta'):
        return factory()


@torch.no_grad()
def init_random_weights_(module: nn.Module, seed: int, device: torch.device | str = 'cpu',
                         dtype: Optional[torch.dtype] = None,
                         dtype_rule: Optional[Callable[[str, torch.Tensor],
                                                       torch.dtype]] = None,
                         place: Optional[Callable[[str, torch.Tensor],
                                                  torch.Tensor]] = None,
                         after_fill: Optional[Callable[[str, torch.Tensor],
                                                       None]] = None) -> nn.Module:
    """Materialise `module` on `device` (from meta if needed) and fill it deterministically:
    each tensor of `random_tensors(module, ...)` handed to `place(name, tensor)` when given
    (which returns where it lives, e.g. page-locked host memory), so at most one tensor
    beyond the placed ones exists on `device` at a time."""
    for name, t in random_tensors(module, seed, device, dtype, dtype_rule, after_fill):
        _replace(module, name, place(name, t) if place is not None else t)
    return module


@torch.no_grad()
def random_tensors(module: nn.Module, seed: int, device: torch.device | str = 'cpu',
                   dtype: Optional[torch.dtype] = None,
                   dtype_rule: Optional[Callable[[str, torch.Tensor], torch.dtype]] = None,
                   after_fill: Optional[Callable[[str, torch.Tensor], None]] = None
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """The deterministic random weights of `module` as a stream of (name, tensor), in
    state-dict order (the shapes are read from `module`, which may be on meta and is not
    changed): each tensor is created directly in its final dtype (`dtype` for every floating
    tensor, or `dtype_rule(name, tensor)` per tensor, see wan/utils/dtype_policy.py; else as
    built) and filled on `device`. `after_fill(name, tensor)` may edit a tensor in place once
    it is filled.
    Rules by name: norm scales ('norm', 'gamma') are ones; 'modulation' tables are
    randn/sqrt(dim); other tensors with >= 2 dims are normal(0, 1/sqrt(fan_in)); 1-D biases
    are normal(0, 0.02). Values are drawn in fp32 in state-dict order, so the same seed and
    device give the same weights whatever the storage dtypes and placement (up to rounding).
    """
    device = torch.device(device)
    if dtype is not None and dtype_rule is None:
        dtype_rule = (lambda name, t: dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, t in module.state_dict(keep_vars=True).items():
        target = dtype_rule(name, t) if dtype_rule is not None else t.dtype
        if t.is_meta or t.device != device or t.dtype != target:
            t = torch.empty(t.shape, dtype=target, device=device) if t.is_meta else \
                t.to(device=device, dtype=target)
        if t.is_floating_point():
            owner, _, leaf = name.rpartition('.')
            if leaf == 'gamma' or (leaf == 'weight' and
                                   owner.rpartition('.')[2].startswith('norm')):
                t.fill_(1.0)
            elif leaf == 'modulation':
                _normal_(t, 1.0 / math.sqrt(t.shape[-1]), gen)
            elif t.dim() >= 2:
                _normal_(t, 1.0 / math.sqrt(max(1, t[0].numel())), gen)
            else:
                _normal_(t, 0.02, gen)
            if after_fill is not None:
                after_fill(name, t)
        yield name, t


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition('.')
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    # Sample in fp32 so that the values do not depend on the storage dtype's RNG path.
    if t.dtype == torch.float32:
        t.normal_(0.0, std, generator=gen)
    else:
        t.copy_(torch.empty(t.shape, device=t.device, dtype=torch.float32).normal_(
            0.0, std, generator=gen))
