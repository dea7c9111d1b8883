"""The one decision of which dtype each weight is stored in.

Models declare, as upstream's diffusers-style `_keep_in_fp32_modules`, the parts that run
inside fp32 islands (for WanModel: the time MLP, the time projection, the head, the q/k
RMSNorms, the cross-attention LayerNorm and the modulation tables). Every other floating
weight is used only as a matmul/conv input under the compute dtype's autocast, which casts it
to that dtype on every call: storing it in that dtype once is the same math.

Modes (`DTYPE_MODES`):
- 'checkpoint': keep each tensor's dtype as stored in the file (upstream's default);
- 'all': every floating tensor in the compute dtype (upstream's `--convert_model_dtype`;
  the fp32 islands then compute in fp32 from bf16 weights, exactly as upstream does);
- 'matmul': matmul/conv weights in the compute dtype, the fp32 islands as stored (fp32 in the
  release): the optimized path, the numbers of 'checkpoint' at about half the memory. Island
  weights are never up-cast: an RMSNorm multiplies by its weight outside autocast, so a
  bf16-stored weight must stay bf16 to compute what upstream computes with that file.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ['DTYPE_MODES', 'keeps_fp32', 'dtype_rule', 'apply_dtype_policy_']

DTYPE_MODES = ('checkpoint', 'all', 'matmul')
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def keeps_fp32(model: nn.Module | type, name: str) -> bool:
    """Whether tensor `name` of `model` belongs to an fp32 island (the model's declaration)."""
    keep = getattr(model, '_keep_in_fp32_modules', ())
    return any(part in keep for part in name.split('.'))


def dtype_rule(model: nn.Module | type, mode: str,
               compute_dtype: torch.dtype) -> Callable[[str, torch.Tensor], torch.dtype]:
    """(name, tensor) -> the dtype to store it in, for `mode` (module docstring)."""
    if mode not in DTYPE_MODES:
        raise ValueError(f'unknown dtype mode {mode!r}; choose from {DTYPE_MODES}')

    def rule(name: str, tensor: torch.Tensor) -> torch.dtype:
        # fp8 weights (and anything not floating) are used as they are stored, and an fp8
        # weight's scale is part of its format: fp32 in every mode
        if not tensor.is_floating_point() or mode == 'checkpoint' or \
                tensor.dtype in FP8_DTYPES:
            return tensor.dtype
        if name.rpartition('.')[2] == 'weight_scale':
            return torch.float32
        if mode == 'all':
            return compute_dtype
        return tensor.dtype if keeps_fp32(model, name) else compute_dtype
    return rule


@torch.no_grad()
def apply_dtype_policy_(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Convert an already-built model's parameters and buffers to the policy; returns how many
    tensors changed dtype."""
    rule = dtype_rule(model, mode, compute_dtype)
    changed = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        dtype = rule(name, t)
        if t.dtype != dtype:
            t.data = t.data.to(dtype)
            changed += 1
    return changed
