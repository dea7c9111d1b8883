"""Block streaming: run an expert whose blocks live in page-locked host memory.

`StreamingBlockRunner` is a `BlockRunner` (wan/modules/model.py). Every block's tensors are
packed into one flat host buffer (page-locked when CUDA is present), all blocks with the same
byte layout. Two GPU slots of that layout take turns: while block i computes from slot i % 2,
block i+1 is copied into the other slot on a side stream; CUDA events order the copy after
the compute that last read the slot, and the compute after its copy. During its call a
block's parameters are views of its slot (so a compiled block sees the same shapes, dtypes,
strides and alignment every time: one graph, no recompiles); between calls they are views of
the host buffer, so the model's state dict stays the real weights.

Several passes (CFG's conditional and unconditional ones) run through each block before the
next is needed (`WanModel.forward_passes`), so a step copies each block once, not twice.

The non-block weights (embeddings, time MLP, head; ~1.5 % of an A14B expert) stay on the GPU.
The same code runs on the CPU with synchronous copies, which is how the tests check that
streaming computes exactly what the resident model computes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..modules.model import BlockInputs, BlockRunner
from .host_memory import HostArena

__all__ = ['BlockLayout', 'SlotPair', 'StreamingBlockRunner', 'stream_blocks', 'make_place',
           'unstream_blocks']

ALIGN = 256  # bytes: every tensor view starts on a 256-byte boundary (GEMM/TMA friendly)


@dataclass(frozen=True)
class _Entry:
    name: str  # within the block, e.g. 'self_attn.q.weight'
    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes
    nbytes: int


class BlockLayout:
    """Byte layout of one block's parameters and buffers in a flat buffer."""

    def __init__(self, block: nn.Module):
        entries, offset = [], 0
        for name, t in _block_tensors(block):
            nbytes = t.numel() * t.element_size()
            entries.append(_Entry(name, tuple(t.shape), t.dtype, offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.entries: List[_Entry] = entries
        self.nbytes = offset

    def signature(self) -> Tuple:
        return tuple((e.name, e.shape, e.dtype) for e in self.entries)

    def views(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The block's tensors as views of `flat` (a uint8 buffer of `nbytes`)."""
        return {e.name: flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
                for e in self.entries}


def _indexed(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:N' (the current device), so that device comparisons hold."""
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device())
    return device


def _block_tensors(block: nn.Module):
    yield from block.named_parameters()
    yield from block.named_buffers()


def _rebind(block: nn.Module, views: Dict[str, torch.Tensor]) -> None:
    for name, value in views.items():
        owner_name, _, attr = name.rpartition('.')
        owner = block.get_submodule(owner_name) if owner_name else block
        if attr in owner._parameters:
            owner._parameters[attr].data = value
        else:
            owner._buffers[attr] = value


class SlotPair:
    """The two GPU block slots, shared by every streamed model of one layout; allocated when
    first needed, released with `release` (e.g. when nothing streams any more)."""

    def __init__(self):
        self.buffers: Optional[List[torch.Tensor]] = None

    def get(self, nbytes: int, device: torch.device) -> List[torch.Tensor]:
        if self.buffers is None:
            self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device)
                            for _ in range(2)]
        elif self.buffers[0].numel() != nbytes or self.buffers[0].device != _indexed(device):
            raise ValueError(f'shared slots hold {self.buffers[0].numel()} bytes on '
                             f'{self.buffers[0].device}; this model needs {nbytes} on {device}')
        return self.buffers

    @property
    def nbytes(self) -> int:
        return 0 if self.buffers is None else sum(b.numel() for b in self.buffers)

    def release(self) -> None:
        self.buffers = None


class StreamingBlockRunner(BlockRunner):
    """Streams `blocks` (already in their final dtypes, on any device or on meta) through
    two slots on `device`. Use `place` while loading to write each tensor straight into the
    host buffer, or `adopt` to move already materialised blocks there."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str,
                 slots: Optional['SlotPair'] = None):
        """`slots`: a `SlotPair` shared with another streamed model of the same block layout
        (only one model runs at a time); default: a pair of its own. The GPU buffers are
        allocated at the first forward, after the blocks have left the GPU."""
        self.device = _indexed(torch.device(device))
        self.layout = BlockLayout(blocks[0])
        for i, block in enumerate(blocks):
            if BlockLayout(block).signature() != self.layout.signature():
                raise ValueError(f'block {i} differs in layout from block 0: blocks must be '
                                 'identical to stream through shared slots')
        n, size = len(blocks), self.layout.nbytes
        self.cuda = self.device.type == 'cuda'
        # one flat host buffer; page-locked in one call once filled (`pin`)
        self._arena = HostArena(n * size + ALIGN, alignment=ALIGN)
        self.host = self._arena.take((n * size,), torch.uint8)
        self.host_views = [self.layout.views(self.host[i * size:(i + 1) * size])
                           for i in range(n)]
        self.slots = slots if slots is not None else SlotPair()
        # (the slot buffers the views were made of, the block's views of each slot)
        self._slot_views: Optional[Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]] \
            = None
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.block_index = {id(b): i for i, b in enumerate(blocks)}
        self.bytes_per_block = size
        logging.info('block streaming: %d blocks x %.0f MB in host memory, 2 slots on %s',
                     n, size / 1e6, self.device)

    # ------------------------------------------------------------------ filling
    def place(self, index: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Write one tensor of block `index` into the host buffer; returns the host view
        (the loader assigns it to the parameter)."""
        view = self.host_views[index][name]
        view.copy_(tensor)
        return view

    @torch.no_grad()
    def adopt(self, blocks: nn.ModuleList) -> None:
        """Copy materialised blocks into the host buffer and point them at it (their former
        storage, e.g. on the GPU, is released), then page-lock it."""
        for i, block in enumerate(blocks):
            views = self.host_views[i]
            for name, t in _block_tensors(block):
                views[name].copy_(t)
            _rebind(block, views)
        self.pin()

    def pin(self) -> bool:
        """Page-lock the filled host buffer (CUDA only; one registration call)."""
        return self._arena.pin() if self.cuda else False

    # ------------------------------------------------------------------ running
    def _slots_now(self) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
        """The two GPU slots (allocated on first use) and the block's views of them."""
        buffers = self.slots.get(self.bytes_per_block, self.device)
        if self._slot_views is None or self._slot_views[0] is not buffers:
            self._slot_views = (buffers, [self.layout.views(b) for b in buffers])
        return self._slot_views

    def _copy_in(self, index: int) -> Optional[torch.cuda.Event]:
        slot = self._slots_now()[0][index % 2]
        src = self.host[index * self.bytes_per_block:(index + 1) * self.bytes_per_block]
        if not self.cuda:
            slot.copy_(src)
            return None
        with torch.cuda.stream(self.copy_stream):
            slot.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def __call__(self, blocks: nn.ModuleList, xs: List[torch.Tensor],
                 inputs: List[BlockInputs]) -> List[torch.Tensor]:
        n = len(blocks)
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda:
            # the slots may still be read by the previous forward's last blocks
            self.copy_stream.wait_stream(compute)
        copied = {0: self._copy_in(0)}
        freed: Dict[int, torch.cuda.Event] = {}
        for i, block in enumerate(blocks):
            if i + 1 < n:
                if self.cuda and i >= 1:
                    # slot (i+1) % 2 was last read by block i-1
                    self.copy_stream.wait_event(freed[i - 1])
                copied[i + 1] = self._copy_in(i + 1)
            if self.cuda:
                compute.wait_event(copied.pop(i))
            _rebind(block, self._slots_now()[1][i % 2])
            try:
                xs[:] = [self.run_block(i, block, x, a) for x, a in zip(xs, inputs)]
            finally:
                _rebind(block, self.host_views[i])
            if self.cuda:
                freed[i] = torch.cuda.Event()
                freed[i].record(compute)
        return xs

    def close(self) -> None:
        """Release the page-locked registration (the host buffer itself is freed with the
        model)."""
        self._arena.close()


def stream_blocks(model: nn.Module, device: torch.device | str,
                  slots: Optional[SlotPair] = None) -> StreamingBlockRunner:
    """Make an already materialised WanModel stream its blocks from host memory: the blocks
    move to a (page-locked) host buffer, everything else to `device`; returns the runner,
    installed as `model.block_runner`."""
    runner = StreamingBlockRunner(model.blocks, device, slots)
    runner.adopt(model.blocks)
    block_ids = {id(p) for p in model.blocks.parameters()}
    for p in model.parameters():
        if id(p) not in block_ids:
            p.data = p.data.to(device)
    model.freqs = model.freqs.to(device)
    model.block_runner = runner
    return runner


def make_place(runner: StreamingBlockRunner, device: torch.device | str
               ) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The loader's `place` hook for a streamed expert: `blocks.N.*` into the host buffer,
    everything else to `device`."""
    def place(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.startswith('blocks.'):
            _, index, rest = name.split('.', 2)
            return runner.place(int(index), rest, tensor)
        return tensor.to(device)
    return place


@torch.no_grad()
def unstream_blocks(model: nn.Module, device: torch.device | str) -> None:
    """The inverse of `stream_blocks`: every block weight copied to `device` (the model is
    resident again), the default block runner back, the page-locked registration released."""
    runner = model.block_runner
    if not isinstance(runner, StreamingBlockRunner):
        return
    for block in model.blocks:
        for _, t in _block_tensors(block):
            t.data = t.data.to(device)
    model.block_runner = BlockRunner()
    runner.close()
