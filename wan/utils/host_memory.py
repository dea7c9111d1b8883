"""Page-locked host storage for weights that stream to the GPU or move back and forth.

A `HostArena` is one plain host buffer that the tensors of a model are carved out of as
aligned views, page-locked in one `cudaHostRegister` call once it has been filled:

    nbytes = plan_host_layout({name: (p.shape, p.dtype) for name, p in tensors})
    arena = HostArena(nbytes)
    host_weight = arena.take(shape, dtype)   # fill the views while loading ...
    arena.pin()                              # ... then page-lock them all at once

Fill first, pin second: registering memory that has been written takes ~0.25 s per 4 GiB on
the H200 host, registering untouched memory ~1.7 s (the pages are faulted in during the
call), and allocating page-locked memory with `pin_memory()` ~2.2 s. Views copy to the GPU at
~50 GB/s once pinned (the same host: ~6 GB/s from pageable memory).

Without CUDA the arena stays an ordinary buffer, so the carving runs and is tested on the
CPU. The registration is undone by `close()`, or when the arena is garbage collected; views
taken from it keep the memory alive but are pageable after that, so the owner keeps the arena
for as long as its views are copied from.
"""
from __future__ import annotations

import logging
import math
import time
import weakref
from typing import Mapping, Sequence, Tuple

import torch

__all__ = ['HostArena', 'plan_host_layout', 'ALIGNMENT']

# view start addresses are multiples of this (covers every dtype and the copy engines' taste)
ALIGNMENT = 256


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def plan_host_layout(named_shapes_dtypes: Mapping[str, Tuple[Sequence[int], torch.dtype]],
                     alignment: int = ALIGNMENT) -> int:
    """Bytes of a HostArena that can hold these tensors (name -> (shape, dtype)), each taken
    once, in any order: every tensor rounded up to `alignment`, plus one `alignment` of slack
    for the buffer's own start address."""
    total = 0
    for shape, dtype in named_shapes_dtypes.values():
        nbytes = math.prod(shape) * dtype.itemsize
        total += _align(nbytes, alignment)
    return total + alignment


def _cuda_register(ptr: int, nbytes: int) -> bool:
    """Page-lock [ptr, ptr + nbytes); False when there is no CUDA to register with."""
    if not torch.cuda.is_available():
        return False
    try:
        cudart = torch.cuda.cudart()
    except (AssertionError, RuntimeError) as exc:  # CPU-only build, or no usable driver
        logging.info('host memory stays pageable: %s', exc)
        return False
    # flags 0 (cudaHostRegisterDefault): page-locked for the CUDA context of this process
    torch.cuda.check_error(cudart.cudaHostRegister(ptr, nbytes, 0))
    return True


def _cuda_unregister(buffer: torch.Tensor) -> None:
    """Finalizer: holds `buffer` (so the memory cannot be freed while registered) until it has
    been unregistered."""
    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
    except Exception as exc:  # a failing unregister must not take the caller down
        logging.warning('cudaHostUnregister failed: %s', exc)


class HostArena:
    """One host buffer handing out aligned views; `pin()` page-locks it when CUDA is
    available."""

    def __init__(self, nbytes: int, alignment: int = ALIGNMENT):
        if nbytes < 0:
            raise ValueError(f'HostArena size must be >= 0 bytes, got {nbytes}')
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f'alignment must be a power of two, got {alignment}')
        self.nbytes = int(nbytes)
        self.alignment = alignment
        self._buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        self._base = self._buffer.data_ptr()
        self._offset = 0
        self._finalizer = None
        self._closed = False

    def pin(self) -> bool:
        """Page-lock the whole buffer (once; best after its views were filled); returns whether
        it is page-locked (False without CUDA)."""
        if self._finalizer is not None or self._closed or self.nbytes == 0:
            return self.pinned
        t0 = time.perf_counter()
        if _cuda_register(self._base, self.nbytes):
            self._finalizer = weakref.finalize(self, _cuda_unregister, self._buffer)
            # at exit the process's memory goes away anyway; CUDA may be torn down first
            self._finalizer.atexit = False
            logging.info('page-locked %.2f GiB of host memory in %.2f s',
                         self.nbytes / 2**30, time.perf_counter() - t0)
        return self.pinned

    @property
    def pinned(self) -> bool:
        """Whether the buffer is page-locked now."""
        return self._finalizer is not None and self._finalizer.alive

    @property
    def used(self) -> int:
        """Bytes handed out so far, alignment padding included."""
        return self._offset

    @property
    def free(self) -> int:
        return self.nbytes - self._offset

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A new contiguous tensor of `shape` and `dtype` viewing the next aligned bytes."""
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        start = _align(self._base + self._offset, self.alignment) - self._base
        if start + nbytes > self.nbytes:
            raise ValueError(f'HostArena of {self.nbytes} bytes cannot hold {nbytes} more bytes '
                             f'for a {dtype} tensor of shape {list(shape)} ({self.free} free); '
                             f'size it with plan_host_layout()')
        self._offset = start + nbytes
        return self._buffer[start:start + nbytes].view(dtype).view(shape)

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` in the arena (same shape and dtype)."""
        out = self.take(tensor.shape, tensor.dtype)
        out.copy_(tensor)
        return out

    def close(self) -> None:
        """Unregister the buffer (idempotent; a closed arena is not pinned again). Views stay
        valid, now pageable."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    def __repr__(self) -> str:
        return (f'HostArena({self.nbytes} bytes, {self.used} used, '
                f'{"page-locked" if self.pinned else "pageable"})')
