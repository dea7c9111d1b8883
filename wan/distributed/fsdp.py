"""FSDP sharding of the DiT experts and the T5 encoder (docs/PIPELINE.md#fsdp).

`shard_model` wraps a module with torch FullyShardedDataParallel exactly as upstream Wan2.2's
wan/distributed/fsdp.py (`shard_model`) does: FULL_SHARD, one FSDP unit per element of
`model.blocks` (lambda auto-wrap policy), MixedPrecision(bf16 params, fp32 reduce, fp32
buffers), `device_id` = the local GPU, `sync_module_states=True` for the DiT (T5EncoderModel
passes False) and `use_orig_params=False`.

CPU (gloo) support, for tests and GPU-less machines: FSDP runs on the CPU when given
`device_id=torch.device('cpu')` (an int device id on a machine without CUDA maps to the CPU
here). FSDP's own `sync_module_states=True` refuses CPU tensors, so on the CPU the same effect
-- every rank starts from rank 0's weights -- is obtained by broadcasting every parameter and
buffer from the group's first rank before wrapping, then wrapping with
`sync_module_states=False`.
"""
from __future__ import annotations

import gc
from functools import partial
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

__all__ = ['shard_model', 'free_model', 'broadcast_module_states', 'resolve_fsdp_device']


def resolve_fsdp_device(device_id: Union[int, str, torch.device, None]) -> torch.device:
    """The device FSDP puts the shards on: cuda:N for an int on a CUDA machine, the CPU for an
    int (or None) without CUDA, the given device otherwise."""
    if device_id is None:
        return torch.device('cuda', torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device('cpu')
    if isinstance(device_id, int):
        return torch.device('cuda', device_id) if torch.cuda.is_available() \
            else torch.device('cpu')
    return torch.device(device_id)


@torch.no_grad()
def broadcast_module_states(module: nn.Module, process_group=None) -> None:
    """Copy the group's first rank's parameters and buffers to every rank of the group."""
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=process_group)


def shard_model(model: nn.Module,
                device_id: Union[int, str, torch.device, None],
                param_dtype: torch.dtype = torch.bfloat16,
                reduce_dtype: torch.dtype = torch.float32,
                buffer_dtype: torch.dtype = torch.float32,
                process_group=None,
                sharding_strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD,
                sync_module_states: bool = True) -> FSDP:
    """Wrap `model` with FSDP, one unit per element of `model.blocks` (module docstring)."""
    device = resolve_fsdp_device(device_id)
    blocks = getattr(model, 'blocks', None)
    block_ids = {id(b) for b in blocks} if blocks is not None else set()
    if device.type == 'cpu' and sync_module_states:
        # FSDP's sync_module_states needs GPU tensors; same result by an explicit broadcast
        broadcast_module_states(model, process_group)
        sync_module_states = False
    return FSDP(
        module=model,
        process_group=process_group,
        sharding_strategy=sharding_strategy,
        auto_wrap_policy=partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in block_ids),
        mixed_precision=MixedPrecision(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                       buffer_dtype=buffer_dtype),
        device_id=device,
        sync_module_states=sync_module_states,
        use_orig_params=False)


def free_model(model: Optional[nn.Module]) -> None:
    """Release the storage of an FSDP-wrapped model's flat parameters now (not at GC time)."""
    if model is None:
        return
    for m in model.modules():
        handle = getattr(m, '_handle', None) if isinstance(m, FSDP) else None
        flat = getattr(handle, 'flat_param', None)
        if flat is not None and flat.data.untyped_storage().size() > 0:
            flat.data.untyped_storage().resize_(0)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
