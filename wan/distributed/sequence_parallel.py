"""Ulysses sequence parallelism for WanModel (REFERENCE.md §9, pitfall 25).

`apply_sequence_parallel(model, group)` patches one WanModel *instance* (methods bound with
`types.MethodType`; the classes in wan/modules/model.py are untouched) so that its forward
runs on N ranks of `group`, each holding seq_len / N tokens:

1. patch, time and text embeddings as usual; `seq_len` is already a multiple of N
   (WanT2V.generate rounds it up to a multiple of the SP size);
2. x, and e / e0 when they carry one row per token, are split along the sequence into N
   contiguous chunks; rank r keeps chunk r (e / e0 with a token axis of 1, i.e.
   `ForwardOptions.per_sample_time`, are broadcast and stay whole);
3. self-attention: q/k/v and the q/k RMSNorm locally; RoPE with the rank's slice of the
   full-sequence table, padded with the identity rotation 1+0i past the true length (both the
   reference float64 path and the `fast_rope` fp32 table path); q, k, v cast to the attention
   dtype; all_to_all scatters heads and gathers the sequence, (B, s, H, D) -> (B, N*s, H/N, D);
   attention over the full sequence with k_lens = the true lengths (padded keys excluded,
   queries not trimmed); all_to_all back; then the `o` Linear;
4. cross-attention, FFN and modulation are local;
5. the head runs locally, its output is all_gathered along the sequence and every rank
   unpatchifies the full prediction.

Only torch.distributed collectives are used (`all_to_all_single`, `all_gather`); both work with
NCCL on GPU and gloo on CPU.
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch
import torch.distributed as dist

from ..modules.attention import attention
from ..modules.model import WanModel, _grid_freqs, rope_apply_fast

__all__ = ['apply_sequence_parallel', 'all_to_all_heads_to_seq', 'all_to_all_seq_to_heads',
           'gather_sequence', 'sp_rope_freqs', 'sp_rope_apply', 'check_sp_heads']


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


# --------------------------------------------------------------------------- RoPE
def sp_rope_freqs(grid_sizes: torch.Tensor, freqs: torch.Tensor, seq_len: int, rank: int,
                  world: int) -> torch.Tensor:
    """complex128 (B, s, 1, head_dim/2): the rank's slice of the full-sequence RoPE table.

    The table covers the true tokens in (f, h, w) order and is padded with 1+0i (the identity
    rotation) up to seq_len = world * s; rank r gets rows [r*s, (r+1)*s).
    """
    s = seq_len // world
    out = []
    for f, h, w in grid_sizes.tolist():
        seq = f * h * w
        fi = _grid_freqs(freqs, f, h, w)  # the table rope_apply uses, (seq, head_dim/2)
        pad = torch.ones(seq_len - seq, fi.size(1), dtype=fi.dtype, device=fi.device)
        fi = torch.cat([fi, pad])
        out.append(fi[rank * s:(rank + 1) * s])
    return torch.stack(out).unsqueeze(2)


def sp_rope_apply(x: torch.Tensor, freqs_local: torch.Tensor) -> torch.Tensor:
    """Reference RoPE on local tokens: float64 complex product with the rank's table, fp32 out.

    Equal to `rope_apply` on the same rows: true tokens get the same float64 product, padded
    tokens are multiplied by 1+0i, which leaves them unchanged exactly.
    """
    b, s, n, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, s, n, d // 2, 2))
    return torch.view_as_real(xc * freqs_local).flatten(3).float()


# --------------------------------------------------------------------------- patched methods
def _sp_self_attn_forward(self, x, seq_lens, grid_sizes, freqs, rope_table=None):
    """WanSelfAttention.forward under SP. `freqs` is the rank's complex RoPE slice
    (sp_rope_freqs) on the reference path; `rope_table` the rank's fp32 (cos, sin) slice on
    the fast_rope path."""
    q, k, v = self.qkv(x)
    if rope_table is not None:
        dt = self.options.attn_dtype
        q, k = rope_apply_fast(q, rope_table, dt), rope_apply_fast(k, rope_table, dt)
    else:
        q, k = sp_rope_apply(q, freqs), sp_rope_apply(k, freqs)
    x = self.attend(q, k, v, seq_lens)
    return self.o(x.flatten(2))


def _sp_attend(self, q, k, v, k_lens):
    """Ulysses attention: heads scattered, sequence gathered, full-sequence attention with the
    true key lengths, then back to local tokens with all heads."""
    group = self._sp_group
    out_dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    dt = self.options.attn_dtype
    # cast before the exchange, as the reference (half the bytes on the wire)
    q, k, v = (u if u.dtype in half else u.to(dt) for u in (q, k, v))
    q, k, v = (all_to_all_heads_to_seq(u, group) for u in (q, k, v))
    x = attention(q, k, v, k_lens=k_lens, window_size=self.window_size, dtype=dt,
                  backend=self.options.attn_backend)
    return all_to_all_seq_to_heads(x, group).to(out_dtype)


def _split_tokens(u: torch.Tensor, seq_len: int, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous chunk of a (B, seq_len, ...) tensor; (B, 1, ...) stays whole."""
    if u.size(1) == 1:
        return u
    if u.size(1) != seq_len:
        raise ValueError(f'token axis {u.size(1)} is neither 1 nor seq_len {seq_len}')
    s = seq_len // world
    return u[:, rank * s:(rank + 1) * s]


def _sp_forward(self, x: List[torch.Tensor], t: torch.Tensor, context: List[torch.Tensor],
                seq_len: int, y: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """WanModel.forward under Ulysses SP (module docstring): the same embeddings
    (WanModel.embed/time_embed), then the split, the RoPE slice and the gather."""
    if y is not None:
        raise ValueError('y (image conditioning) is not used by the t2v model')
    group = self._sp_group
    world, rank = _group_size_rank(group)
    if seq_len % world != 0:
        raise ValueError(f'seq_len {seq_len} must be a multiple of the sequence-parallel size '
                         f'{world} (WanT2V.generate rounds it up)')
    x, grid_sizes, seq_lens, t, context = self.embed(x, t, context, seq_len)
    if t.size(1) == seq_len:
        # only this rank's tokens need a time embedding: the MLP is row-wise
        t = _split_tokens(t, seq_len, rank, world)
    e, e0 = self.time_embed(t)
    device = x.device

    # SP: this rank's contiguous chunk of the sequence and of its RoPE table
    x = _split_tokens(x, seq_len, rank, world)
    if self.options.fast_rope:
        s = seq_len // world
        rope_table = self._rope_table(grid_sizes, seq_len, device)[:, rank * s:(rank + 1) * s]
        freqs = self.freqs
    else:
        rope_table = None
        freqs = sp_rope_freqs(grid_sizes, self.freqs, seq_len, rank, world)
    # keys are trimmed to the true lengths after the all_to_all (full sequence); None when
    # nothing is padded, as WanModel.forward
    k_lens = None if bool((seq_lens == seq_len).all()) else seq_lens
    for block in self.blocks:
        x = block(x, e0, k_lens, grid_sizes, freqs, context, None, rope_table)

    # 5. head on local tokens, gather the sequence, unpatchify on every rank
    x = self.head(x, e)
    x = gather_sequence(x, group, dim=1)
    return [u.float() for u in self.unpatchify(x, grid_sizes)]


# --------------------------------------------------------------------------- entry point
def check_sp_heads(num_heads: int, sp_size: int) -> None:
    """ValueError unless the heads split evenly over the SP ranks (raised on every rank)."""
    if sp_size < 1 or num_heads % sp_size != 0:
        raise ValueError(f'Ulysses sequence parallelism needs the {num_heads} attention heads '
                         f'to be divisible by the sequence-parallel size {sp_size}')


def apply_sequence_parallel(model: WanModel, group=None) -> WanModel:
    """Patch `model` (in place, returned) for Ulysses SP over `group` (None: the world).

    Must be called before FSDP wrapping; every rank of `group` must call the patched forward
    with the same inputs and a seq_len divisible by the group size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError('apply_sequence_parallel needs an initialized process group')
    world = dist.get_world_size(group)
    check_sp_heads(model.num_heads, world)
    model._sp_group = group
    model._sp_size = world
    model.forward = types.MethodType(_sp_forward, model)
    for block in model.blocks:
        attn = block.self_attn
        attn._sp_group = group
        attn.forward = types.MethodType(_sp_self_attn_forward, attn)
        attn.attend = types.MethodType(_sp_attend, attn)
    return model
