"""Ulysses sequence parallelism for WanModel (upstream wan/distributed/sequence_parallel.py).

`UlyssesParallel(group)` is a `SequenceParallel` strategy (wan/modules/model.py): set on a
model with `model.set_sequence_parallel(...)` (or `apply_sequence_parallel(model, group)`),
it makes the model's one forward run on the N ranks of `group`, each holding seq_len / N
tokens:

1. patch, time and text embeddings as usual; `seq_len` is already a multiple of N
   (WanT2V.seq_len_for rounds it up to a multiple of the SP size);
2. `split`: x, the per-token timesteps and the per-token RoPE table are cut along the
   sequence into N contiguous chunks; rank r keeps chunk r (a token axis of 1, i.e.
   `ForwardOptions.per_sample_time`, is broadcast and stays whole). The RoPE table is padded
   with the identity rotation past the true length, so each rank's rows are exactly its
   tokens' rotations;
3. `attention`, around each self-attention kernel call: q/k/v come out of the local
   projections, RMSNorm and RoPE; they are cast to the attention dtype; all_to_all scatters
   heads and gathers the sequence, (B, s, H, D) -> (B, N*s, H/N, D); attention over the full
   sequence with k_lens = the true lengths (padded keys excluded, queries not trimmed);
   all_to_all back;
4. cross-attention, FFN and modulation are local;
5. `gather`: the head runs locally, its output is all_gathered along the sequence and every
   rank unpatchifies the full prediction.

Only torch.distributed collectives are used (`all_to_all_single`, `all_gather`); both work with
NCCL on GPU and gloo on CPU.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..modules.model import SequenceParallel, WanModel

__all__ = ['UlyssesParallel', 'apply_sequence_parallel', 'all_to_all_heads_to_seq',
           'all_to_all_seq_to_heads', 'gather_sequence', 'check_sp_heads']


# --------------------------------------------------------------------------- collectives
def _group_size_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def all_to_all_heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, s, H, D) local tokens, all heads -> (B, N*s, H/N, D) all tokens, this rank's heads.

    Rank r receives head chunk r of every rank's tokens, concatenated in rank order (which is
    the sequence order, since rank i holds chunk i of the sequence).
    """
    n, _ = _group_size_rank(group)
    if n == 1:
        return x
    b, s, h, d = x.shape
    # (N, B, s, H/N, D): slice j goes to rank j
    send = x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] = rank i's tokens, our heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, n * s, h // n, d)


def all_to_all_seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """Inverse of `all_to_all_heads_to_seq`: (B, N*s, H/N, D) -> (B, s, H, D)."""
    n, _ = _group_size_rank(group)
    if n == 1:
        return x
    b, ns, hn, d = x.shape
    s = ns // n
    # (N, B, s, H/N, D): sequence chunk j goes back to rank j
    send = x.reshape(b, n, s, hn, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] = our tokens, rank i's heads -> heads in rank order
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, n * hn, d)


def gather_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """all_gather the per-rank sequence chunks and concatenate them in rank order."""
    n, _ = _group_size_rank(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


# --------------------------------------------------------------------------- strategy
class UlyssesParallel(SequenceParallel):
    """Ulysses over the ranks of `group` (None: the world); see the module docstring."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError('Ulysses sequence parallelism needs an initialized process group')
        self.group = group
        self.size, self.rank = _group_size_rank(group)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) == 1:
            return x
        if x.size(1) % self.size:
            raise ValueError(f'token axis {x.size(1)} is not a multiple of the '
                             f'sequence-parallel size {self.size}')
        s = x.size(1) // self.size
        return x[:, self.rank * s:(self.rank + 1) * s]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_sequence(x, self.group, dim=1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_lens: Optional[torch.Tensor], attend: Callable,
                  dtype: torch.dtype) -> torch.Tensor:
        """Heads scattered, sequence gathered, full-sequence attention with the true key
        lengths, then back to local tokens with all heads."""
        out_dtype = q.dtype
        half = (torch.float16, torch.bfloat16)
        # cast before the exchange, as upstream (half the bytes on the wire)
        q, k, v = (u if u.dtype in half else u.to(dtype) for u in (q, k, v))
        q, k, v = (all_to_all_heads_to_seq(u, self.group) for u in (q, k, v))
        x = attend(q, k, v, k_lens)
        return all_to_all_seq_to_heads(x, self.group).to(out_dtype)


# --------------------------------------------------------------------------- entry point
def check_sp_heads(num_heads: int, sp_size: int) -> None:
    """ValueError unless the heads split evenly over the SP ranks (raised on every rank)."""
    if sp_size < 1 or num_heads % sp_size != 0:
        raise ValueError(f'Ulysses sequence parallelism needs the {num_heads} attention heads '
                         f'to be divisible by the sequence-parallel size {sp_size}')


def apply_sequence_parallel(model: WanModel, group=None) -> WanModel:
    """Make `model` (in place, returned) run Ulysses over `group` (None: the world).

    Must be called before FSDP wrapping; every rank of `group` must call the forward with the
    same inputs and a seq_len divisible by the group size.
    """
    sp = UlyssesParallel(group)
    check_sp_heads(model.num_heads, sp.size)
    model.set_sequence_parallel(sp)
    return model
