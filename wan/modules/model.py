"""WanModel: the Wan2.2 diffusion transformer (DiT), one expert of T2V-A14B.

Read top to bottom: embeddings (patch, time, text) -> N x WanAttentionBlock -> Head ->
unpatchify. The default forward reproduces upstream Wan2.2's numerics (docs/MODEL.md),
including its precision map: fp32 islands (time MLP, modulation, norms, head), a float64
sinusoid and RoPE, an fp32 residual stream after block 0's first add, and bf16 matmuls under the
caller's autocast. `ForwardOptions` switches on the exact-math speed-ups of the optimized path
(per-sample time embedding, an fp32 RoPE table, the attention kernel); all of them default to
the reference behaviour.

There is one forward, with two seams (docs/ARCHITECTURE.md):
- `WanModel.block_runner` (a `BlockRunner`): the one loop over the blocks. It runs one or
  several independent passes (e.g. CFG's conditional and unconditional ones) block by block;
  block streaming, step caching and per-block timing replace it with a subclass.
- `WanModel.sequence_parallel` (a `SequenceParallel`): how the tokens are spread over ranks.
  The default keeps them on one rank; Ulysses (wan/distributed/sequence_parallel.py) splits
  the tokens before the blocks, wraps each self-attention in all-to-alls and gathers the
  tokens after the head.
RoPE is prepared once per forward as one per-token table (`WanModel.rope_table`) that every
block receives: complex128 rotations on the reference path, fp32 rotation matrices with
`fast_rope`.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..utils.checkpoint import (DtypeRule, Place, Rename, Transform, chain, iter_safetensors,
                                load_tensors_, require_file, save_sharded_safetensors,
                                safetensors_files)
from ..utils.random_init import build_on_meta, random_tensors
from .attention import attention

__all__ = ['WanModel', 'sinusoidal_embedding_1d', 'rope_params', 'rope_apply',
           'ForwardOptions', 'BlockRunner', 'BlockInputs', 'SequenceParallel', 'LOCAL',
           'apply_rope', 'rope_freqs_table', 'rope_cos_sin', 'rope_apply_fast']


@dataclass
class ForwardOptions:
    """How the forward is computed. The defaults are the reference's numerics."""
    # attention kernel: None uses wan.modules.attention's process default
    attn_backend: Optional[str] = None
    # dtype q/k/v are cast to for the attention kernel (reference: bf16)
    attn_dtype: torch.dtype = torch.bfloat16
    # time MLP and 6*dim projection once per sample instead of once per token (same math)
    per_sample_time: bool = False
    # RoPE from a cached fp32 cos/sin table instead of float64 complex products; its output
    # is rounded straight to attn_dtype (the reference rounds the same fp32 values when the
    # kernel casts q and k), so the attention output needs no fp32 round trip either
    fast_rope: bool = False
    # kernel for cross-attention (512 text keys) when it differs from attn_backend
    cross_attn_backend: Optional[str] = None
    # run the FFN over at most this many tokens at a time (0: all at once). The FFN is
    # per-token, so this is the same math; its (tokens x ffn_dim) hidden activations, the
    # largest of a block, shrink accordingly. GEMMs of other shapes may round differently.
    ffn_chunk_tokens: int = 0


@contextmanager
def _fp32_region(device: torch.device):
    """The reference's `autocast(dtype=float32)` islands.

    On CUDA, autocast with dtype fp32 runs matmuls in fp32 (bf16 weights are upcast). CPU
    autocast knows no fp32 mode, so there the island simply runs with autocast off.
    """
    if device.type == 'cuda':
        with torch.autocast('cuda', dtype=torch.float32):
            yield
    else:
        with torch.autocast(device.type, enabled=False):
            yield


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[cos(p*w_k) ..., sin(p*w_k) ...] with w_k = 10000^(-k/half), computed in float64."""
    assert dim % 2 == 0
    half = dim // 2
    position = position.to(torch.float64)
    omega = torch.pow(10000, -torch.arange(half, dtype=torch.float64,
                                           device=position.device).div(half))
    angles = torch.outer(position, omega)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_params(max_seq_len: int, dim: int, theta: float = 10000) -> torch.Tensor:
    """complex128 table (max_seq_len, dim/2): exp(i * p * theta^(-2j/dim))."""
    assert dim % 2 == 0
    # Explicit CPU device: the table is a plain attribute, also when the model is built on meta.
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64,
                                              device='cpu').div(dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device='cpu'), inv)
    return torch.polar(torch.ones_like(angles), angles)


def _rope_split(head_dim: int) -> List[int]:
    # complex slots per axis (frame, row, column): 22/21/21 for head_dim 128
    c = head_dim // 2
    return [c - 2 * (c // 3), c // 3, c // 3]


def _grid_freqs(freqs: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """(f*h*w, head_dim/2) complex rotations of each token, tokens in (f, h, w) order."""
    parts = freqs.split(_rope_split(freqs.size(1) * 2), dim=1)
    return torch.cat([
        parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, -1)


def rope_apply(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Reference 3D RoPE: float64 complex rotation of interleaved channel pairs, fp32 out.

    x: (B, L, heads, head_dim); grid_sizes: (B, 3) of (F, Hp, Wp); freqs: (1024, head_dim/2)
    complex. Tokens past F*Hp*Wp pass through unrotated.
    """
    n = x.size(2)
    out = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq = f * h * w
        xi = torch.view_as_complex(x[i, :seq].to(torch.float64).reshape(seq, n, -1, 2))
        fi = _grid_freqs(freqs, f, h, w).unsqueeze(1)
        xi = torch.view_as_real(xi * fi).flatten(2)
        out.append(torch.cat([xi, x[i, seq:].to(torch.float64)]))
    return torch.stack(out).float()


def rope_freqs_table(grid_sizes: torch.Tensor, freqs: torch.Tensor,
                     seq_len: int) -> torch.Tensor:
    """complex128 (B, seq_len, 1, head_dim/2): each token's rotation, tokens in (f, h, w)
    order; the identity rotation 1+0i past a sample's true length.

    Multiplying by it is `rope_apply` for every sample at once: the true tokens get the same
    float64 products, and padded tokens times 1+0i come out unchanged.
    """
    tables = []
    for f, h, w in grid_sizes.tolist():
        fi = _grid_freqs(freqs, f, h, w)
        pad = torch.ones(seq_len - f * h * w, fi.size(1), dtype=fi.dtype, device=fi.device)
        tables.append(torch.cat([fi, pad]))
    return torch.stack(tables).unsqueeze(2)


def rope_cos_sin(grid_sizes: torch.Tensor, freqs: torch.Tensor, seq_len: int,
                 device: torch.device) -> torch.Tensor:
    """fp32 (B, seq_len, 1, head_dim/2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]] of
    every (token, channel pair); the identity past the true length.

    The same float64 rotations as `rope_freqs_table`, rounded to fp32, so rotating with it is
    the same math in fp32 instead of float64 (differences at fp32 rounding level).
    """
    table = torch.view_as_real(rope_freqs_table(grid_sizes, freqs.cpu(), seq_len))
    cos, sin = table[..., 0], table[..., 1]
    rot = torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)],
                      dim=-2)
    return rot.to(device=device, dtype=torch.float32)


def rope_apply_fast(x: torch.Tensor, rot: torch.Tensor,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE with the precomputed fp32 rotation matrices of `rope_cos_sin`, computed in fp32,
    returned in `out_dtype` (fp32 like rope_apply by default).

    Each channel pair (a, b) becomes (a cos - b sin, a sin + b cos), written as a 2x2 matrix
    times the pair: the same products and sums, and in a compiled block one pointwise pass
    from the q/k norm to the rounded output, with no fp32 copy of q or k in between (a
    stack of the two halves makes the compiler keep such copies: 2 x 1.44 GiB at 1280*720,
    and ~1.8x the time)."""
    xr = x.float().unflatten(-1, (-1, 2))
    return (xr.unsqueeze(-2) * rot).sum(-1).flatten(-2).to(out_dtype)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Rotate q or k (B, L, heads, head_dim) with the forward's per-token RoPE table.

    A complex table (`rope_freqs_table`) is the reference math: float64 complex products,
    fp32 out (the attention kernel then rounds to its dtype). An fp32 table of rotation
    matrices (`rope_cos_sin`) is the fast path, rounded straight to `out_dtype`.
    """
    if rope.is_complex():
        b, s, n, d = x.shape
        xc = torch.view_as_complex(x.to(torch.float64).reshape(b, s, n, d // 2, 2))
        return torch.view_as_real(xc * rope).flatten(3).float()
    return rope_apply_fast(x, rope, out_dtype)


class SequenceParallel:
    """How a WanModel spreads its tokens over ranks: the default keeps all of them here.

    A subclass (wan/distributed/sequence_parallel.py: Ulysses) overrides the three seams:
    `split` a token-major tensor (B, L, ...) into this rank's chunk before the blocks (a token
    axis of 1, a per-sample value, stays whole), `attention` around each self-attention
    kernel call, and `gather` the chunks back after the head.
    """
    size = 1
    rank = 0

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_lens: Optional[torch.Tensor], attend: Callable,
                  dtype: torch.dtype) -> torch.Tensor:
        """`attend(q, k, v, k_lens)` is the kernel call over the tokens it is given."""
        return attend(q, k, v, k_lens)


LOCAL = SequenceParallel()


@dataclass
class BlockInputs:
    """What every block of one pass receives besides the residual stream."""
    e0: torch.Tensor  # (B, Lt, 6, dim) fp32 modulation input, Lt = tokens or 1
    rope: torch.Tensor  # the per-token RoPE table (see apply_rope)
    context: torch.Tensor  # (B, text_len, dim) embedded text
    k_lens: Optional[torch.Tensor]  # true lengths when keys are padded, else None


class BlockRunner:
    """The one loop over the transformer blocks.

    It runs several independent passes block by block (every pass through block i, then block
    i+1): the same math as running the passes one after another, and what lets a subclass
    that brings each block's weights in (block streaming) do so once for all the passes.
    Override `__call__` to change the schedule, `run_block` to wrap each block call.
    The residual streams `xs` are replaced in the caller's list as the blocks go (the
    caller holds no stale copy: block 0's bf16 input is freed once block 0 returns).
    """

    def __call__(self, blocks: nn.ModuleList, xs: List[torch.Tensor],
                 inputs: List[BlockInputs]) -> List[torch.Tensor]:
        for index, block in enumerate(blocks):
            xs[:] = [self.run_block(index, block, x, a) for x, a in zip(xs, inputs)]
        return xs

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor,
                  a: BlockInputs) -> torch.Tensor:
        return block(x, a.e0, a.rope, a.context, a.k_lens)


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim: normalise in fp32, cast to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) \
            * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class WanSelfAttention(nn.Module):

    def __init__(self, dim: int, num_heads: int, window_size=(-1, -1), qk_norm: bool = True,
                 eps: float = 1e-6):
        assert dim % num_heads == 0
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qk_norm = qk_norm
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # across all heads, not per head (docs/MODEL.md)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.options = ForwardOptions()
        self.sequence_parallel = LOCAL

    def qkv(self, x: torch.Tensor):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        x = _autocast_input(x)  # one cast for the three projections
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor,
                k_lens: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(x)
        dt = self.options.attn_dtype
        q, k = apply_rope(q, rope, dt), apply_rope(k, rope, dt)
        x = self.sequence_parallel.attention(q, k, v, k_lens, self.attend, dt)
        return self.o(x.flatten(2))

    def attend(self, q, k, v, k_lens):
        """The attention kernel call over the tokens given (all of them under Ulysses)."""
        return attention(q, k, v, k_lens=k_lens, window_size=self.window_size,
                         dtype=self.options.attn_dtype, backend=self.options.attn_backend)


class WanCrossAttention(WanSelfAttention):

    def forward(self, x, context, context_lens):
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        x = attention(q, k, v, k_lens=context_lens, dtype=self.options.attn_dtype,
                      backend=self.options.cross_attn_backend or self.options.attn_backend)
        return self.o(x.flatten(2))


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """`x` as autocast would hand it to a linear layer: an fp32 input cast to the autocast
    dtype, once. The same values as letting each of several linears cast it; a compiled
    block then writes one low-precision copy instead of one per consumer."""
    dev = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


def _rows(u: torch.Tensor, rows: slice) -> torch.Tensor:
    """The token rows of a per-token modulation term (B, L, dim); a per-sample one
    (B, 1, dim) broadcasts as is."""
    return u if u.size(1) == 1 else u[:, rows]


class WanAttentionBlock(nn.Module):

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, window_size=(-1, -1),
                 qk_norm: bool = True, cross_attn_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm \
            else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate='tanh'),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.options = ForwardOptions()

    def forward(self, x: torch.Tensor, e: torch.Tensor, rope: torch.Tensor,
                context: torch.Tensor, k_lens: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, L, dim); e: (B, L or 1, 6, dim) fp32; rope: the per-token RoPE table; keys
        of self-attention trimmed to `k_lens` when given. Cross-attention sees every text
        token (the context is zero-padded, with no mask, as upstream).

        The residual stream belongs to the block runner: an fp32 `x` is updated in place
        (one residual buffer instead of one per add); block 0's bf16 input is promoted to an
        fp32 copy first, which is upstream's `x + y * gate` promotion, value for value."""
        assert e.dtype == torch.float32
        with _fp32_region(x.device):
            # (shift, scale, gate) for self-attention, then for the FFN
            m = (self.modulation.unsqueeze(0) + e).chunk(6, dim=2)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (u.squeeze(2) for u in m)

        y = self.self_attn(self.norm1(x).float() * (1 + scale_a) + shift_a, rope, k_lens)
        x = x.float()  # the fp32 residual stream from block 0 on
        with _fp32_region(x.device):
            x.add_(y * gate_a)
        del y

        # cross-attention: affine norm3, no modulation, no gate
        x.add_(self.cross_attn(self.norm3(x), context, None))

        # the FFN is per token: over token chunks when asked, each written back in place
        step = self.options.ffn_chunk_tokens or x.size(1)
        for start in range(0, x.size(1), step):
            rows = slice(start, start + step)
            xs = x[:, rows]
            y = self.ffn(self.norm2(xs).float() * (1 + _rows(scale_f, rows)) +
                         _rows(shift_f, rows))
            with _fp32_region(x.device):
                xs.add_(y * _rows(gate_f, rows))
        return x


class Head(nn.Module):

    def __init__(self, dim: int, out_dim: int, patch_size: Sequence[int], eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = patch_size
        self.eps = eps
        out = math.prod(patch_size) * out_dim
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim); e: the time embedding (B, L or 1, dim) fp32 -- not e0."""
        assert e.dtype == torch.float32
        with _fp32_region(x.device):
            shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)
            return self.head(self.norm(x) * (1 + scale.squeeze(2)) + shift.squeeze(2))


class WanModel(nn.Module):
    """Wan2.2 diffusion transformer (text-to-video expert)."""

    # never read from config.json; the defaults always apply (text_dim is this project's
    # exception: read when present so that tiny test models with small encoders load)
    ignore_for_config = ['patch_size', 'cross_attn_norm', 'qk_norm', 'window_size']
    _no_split_modules = ['WanAttentionBlock']
    # the parts computed inside fp32 islands (docs/MODEL.md#precision-map): their weights keep fp32
    # under the 'matmul' dtype policy (wan/utils/dtype_policy.py); every other weight is only
    # a matmul/conv input under the compute dtype's autocast (fp8 linears' scales stay fp32
    # under every policy: the dtype rule keeps them with their e4m3 weights)
    _keep_in_fp32_modules = ('time_embedding', 'time_projection', 'head', 'modulation',
                             'norm_q', 'norm_k', 'norm3')

    def __init__(self,
                 model_type: str = 't2v',
                 patch_size: Sequence[int] = (1, 2, 2),
                 text_len: int = 512,
                 in_dim: int = 16,
                 dim: int = 2048,
                 ffn_dim: int = 8192,
                 freq_dim: int = 256,
                 text_dim: int = 4096,
                 out_dim: int = 16,
                 num_heads: int = 16,
                 num_layers: int = 32,
                 window_size: Sequence[int] = (-1, -1),
                 qk_norm: bool = True,
                 cross_attn_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        if model_type not in ('t2v', 'i2v', 'ti2v', 's2v'):
            raise ValueError(f'unknown model_type {model_type!r}')
        if model_type != 't2v':
            raise NotImplementedError(f"model_type {model_type!r}: this project implements "
                                      "the text-to-video DiT only")
        self.model_type = model_type
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.window_size = tuple(window_size)
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim),
                                            nn.GELU(approximate='tanh'), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(),
                                            nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([
            WanAttentionBlock(dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm,
                              eps) for _ in range(num_layers)])
        self.head = Head(dim, out_dim, patch_size, eps)
        self.block_runner = BlockRunner()
        self.sequence_parallel = LOCAL

        # complex128 RoPE table, a plain attribute (not a buffer, not in the checkpoint)
        d = dim // num_heads
        assert d % 2 == 0
        self.freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)),
                                rope_params(1024, 2 * (d // 6)),
                                rope_params(1024, 2 * (d // 6))], dim=1)
        self.set_options(ForwardOptions())

    # ------------------------------------------------------------------ seams
    def set_options(self, options: ForwardOptions) -> None:
        """Share one ForwardOptions object with every attention module."""
        self.options = options
        self._rope_cache: Dict[Any, torch.Tensor] = {}
        for m in self.modules():
            if isinstance(m, (WanSelfAttention, WanAttentionBlock)):
                m.options = options

    def set_sequence_parallel(self, sequence_parallel: SequenceParallel) -> None:
        """Spread the tokens over ranks with `sequence_parallel` (LOCAL: one rank)."""
        self.sequence_parallel = sequence_parallel
        for block in self.blocks:
            block.self_attn.sequence_parallel = sequence_parallel

    # ------------------------------------------------------------------ forward
    def forward(self, x: List[torch.Tensor], t: torch.Tensor, context: List[torch.Tensor],
                seq_len: int, y: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """x: list of (C, T', H', W') latents; t: (B,) or (B, seq_len); context: list of
        (L_i, text_dim). Returns the list of predicted velocities (C, T', H', W') in fp32."""
        if y is not None:
            raise ValueError('y (image conditioning) is not used by the t2v model')
        return self.forward_passes([(x, t, context)], seq_len)[0]

    def forward_passes(self, passes: Sequence[Tuple[List[torch.Tensor], torch.Tensor,
                                                    List[torch.Tensor]]],
                       seq_len: int) -> List[List[torch.Tensor]]:
        """Several independent forwards, each given as (x, t, context), run through the
        blocks together by the block runner; each result equals `forward(x, t, context,
        seq_len)` of that pass alone."""
        sp = self.sequence_parallel
        if seq_len % sp.size:
            raise ValueError(f'seq_len {seq_len} must be a multiple of the sequence-parallel '
                             f'size {sp.size} (WanT2V.seq_len_for rounds it up)')
        xs, inputs, heads = [], [], []
        for x, t, context in passes:
            x, grid_sizes, seq_lens, t, context = self.embed(x, t, context, seq_len)
            # per-token timesteps: only this rank's tokens need an embedding (row-wise MLP)
            e, e0 = self.time_embed(sp.split(t))
            rope = sp.split(self.rope_table(grid_sizes, seq_len, x.device))
            # Keys are trimmed to the true lengths; with no padding that is the identity, and
            # passing None lets the kernel skip the varlen packing (and compiled blocks a sync)
            k_lens = None if bool((seq_lens == seq_len).all()) else seq_lens
            xs.append(sp.split(x))
            inputs.append(BlockInputs(e0=e0, rope=rope, context=context, k_lens=k_lens))
            heads.append((e, grid_sizes))
            del x, e0, rope, context
        xs = self.block_runner(self.blocks, xs, inputs)
        del inputs
        out = []
        for x, (e, grid_sizes) in zip(xs, heads):
            x = sp.gather(self.head(x, e))
            out.append([u.float() for u in self.unpatchify(x, grid_sizes)])
        return out

    def embed(self, x: List[torch.Tensor], t: torch.Tensor, context: List[torch.Tensor],
              seq_len: int):
        """Steps 1, 2 and 4 of the forward: the padded patch tokens (B, seq_len, dim), their
        grid sizes and true lengths, the timesteps as (B, seq_len) -- one per token, as the
        reference -- or (B, 1) with per_sample_time, and the embedded text context."""
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)

        # 1. patch embedding, flatten in (f, h, w) order, right-pad to seq_len
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = torch.tensor([u.size(1) for u in x], dtype=torch.long)
        assert seq_lens.max() <= seq_len, f'{int(seq_lens.max())} tokens > seq_len {seq_len}'
        x = torch.cat([torch.cat([u, u.new_zeros(1, seq_len - u.size(1), u.size(2))], dim=1)
                       for u in x])

        # 2. the reference expands t to one timestep per token
        if t.dim() == 1:
            t = t.unsqueeze(1) if self.options.per_sample_time else \
                t.unsqueeze(1).expand(t.size(0), seq_len)
        elif self.options.per_sample_time and bool((t == t[:, :1]).all()):
            t = t[:, :1]

        # 4. text: zero-pad each context to text_len BEFORE the MLP; no cross-attention mask
        context = self.text_embedding(torch.stack([
            torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))]) for u in context]))
        return x, grid_sizes, seq_lens, t, context

    def time_embed(self, t: torch.Tensor):
        """Step 3: e (B, Lt, dim) and e0 (B, Lt, 6, dim) in fp32 for timesteps (B, Lt)."""
        with _fp32_region(self.patch_embedding.weight.device):
            bt, lt = t.shape
            e = self.time_embedding(
                sinusoidal_embedding_1d(self.freq_dim, t.flatten()).unflatten(0, (bt, lt))
                .float())
            e0 = self.time_projection(e).unflatten(2, (6, self.dim))
            assert e.dtype == torch.float32 and e0.dtype == torch.float32
        return e, e0

    def rope_table(self, grid_sizes: torch.Tensor, seq_len: int,
                   device: torch.device) -> torch.Tensor:
        """The per-token RoPE table of one forward (see apply_rope), cached per grid: complex128
        rotations by default, fp32 rotation matrices with `options.fast_rope`."""
        key = (tuple(map(tuple, grid_sizes.tolist())), seq_len, str(device),
               self.options.fast_rope)
        if key not in self._rope_cache:
            self._rope_cache[key] = \
                rope_cos_sin(grid_sizes, self.freqs, seq_len, device) if self.options.fast_rope \
                else rope_freqs_table(grid_sizes, self.freqs.to(device), seq_len)
        return self._rope_cache[key]

    def unpatchify(self, x: torch.Tensor, grid_sizes: torch.Tensor) -> List[torch.Tensor]:
        """(B, L, prod(patch)*C) -> list of (C, F*pt, Hp*ph, Wp*pw); head channels are
        ordered (pt, ph, pw, c) with c fastest."""
        c = self.out_dim
        out = []
        for u, grid in zip(x, grid_sizes.tolist()):
            u = u[:math.prod(grid)].view(*grid, *self.patch_size, c)
            u = torch.einsum('fhwpqrc->cfphqwr', u)
            out.append(u.reshape(c, *[g * p for g, p in zip(grid, self.patch_size)]))
        return out

    # ------------------------------------------------------------------ construction
    def config_dict(self) -> Dict[str, Any]:
        """What config.json holds for this model (diffusers ConfigMixin layout)."""
        return {'_class_name': 'WanModel', '_diffusers_version': '0.35.0',
                'model_type': self.model_type, 'text_len': self.text_len,
                'in_dim': self.in_dim, 'dim': self.dim, 'ffn_dim': self.ffn_dim,
                'freq_dim': self.freq_dim, 'text_dim': self.text_dim, 'out_dim': self.out_dim,
                'num_heads': self.num_heads, 'num_layers': self.num_layers, 'eps': self.eps}

    @classmethod
    def read_config(cls, folder: str) -> Dict[str, Any]:
        path = require_file(os.path.join(folder, 'config.json'), 'DiT config')
        with open(path) as f:
            cfg = json.load(f)
        allowed = set(cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount])
        return {k: v for k, v in cfg.items()
                if k in allowed and k not in cls.ignore_for_config}

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None,
                        device: torch.device | str | None = None, *,
                        dtype_rule: Optional[DtypeRule] = None,
                        rename: Optional[Rename] = None,
                        transform: Optional[Transform] = None,
                        place: Optional[Place] = None,
                        before_load: Optional[Callable[['WanModel'], None]] = None
                        ) -> 'WanModel':
        """Load config.json + safetensors (sharded with an index, or single) from
        `folder/subfolder`, streaming each tensor to `device` (default CPU) in `torch_dtype`
        (default: the checkpoint's dtype, fp32 for the release).

        Keyword-only load-time hooks (wan/utils/checkpoint.py `load_tensors_`): `dtype_rule`
        picks each tensor's dtype instead of `torch_dtype` (wan/utils/dtype_policy.py),
        `rename` maps other formats' names, `transform` edits the tensor stream (LoRA merges,
        fp8), `place` puts each tensor where it lives (GPU, page-locked host memory);
        `before_load(model)` edits the model built on the meta device before any weight is
        read (module swaps)."""
        if torch_dtype is not None and dtype_rule is not None:
            raise ValueError('give torch_dtype or dtype_rule, not both')
        path = os.path.join(folder, subfolder) if subfolder else folder
        if not os.path.isdir(path):
            raise FileNotFoundError(f'DiT checkpoint folder not found: looked for '
                                    f'{os.path.abspath(path)}')
        kwargs = cls.read_config(path)
        files, weight_map = safetensors_files(path)
        model = build_on_meta(lambda: cls(**kwargs))
        if before_load is not None:
            before_load(model)
        tensors = iter_safetensors(files)
        n = len(model.state_dict())
        if n > 100:  # a real expert: show progress over its ~1100 tensors
            from tqdm import tqdm
            tensors = tqdm(tensors, total=n, desc=f'loading {subfolder or path}', unit='tensor')
        load_tensors_(model, tensors, source=path, device=device or 'cpu',
                      dtype=dtype_rule or torch_dtype,
                      expected_names=weight_map.keys() if weight_map else None,
                      rename=rename, transform=transform, place=place)
        model.freqs = model.freqs.to(device or 'cpu')
        return model.eval().requires_grad_(False)

    @classmethod
    def from_source(cls, source: Any, default_kwargs: Dict[str, Any],
                    device: torch.device | str | None = None, *,
                    dtype_rule: Optional[DtypeRule] = None,
                    transform: Optional[Transform] = None,
                    place: Optional[Place] = None,
                    before_load: Optional[Callable[['WanModel'], None]] = None,
                    fp8_dtype: torch.dtype = torch.bfloat16,
                    fp8_keep: Optional[Collection[str]] = None) -> 'WanModel':
        """An expert from any checkpoint layout (a `wan.utils.formats.ComponentSource`): the
        original folder (its config.json), a Diffusers `transformer*/` folder (its config,
        diffusers names mapped to ours) or a ComfyUI single file (no config: `default_kwargs`,
        the task's; scaled fp8 dequantized to `fp8_dtype`, except the e4m3 weights named in
        `fp8_keep`, which stay as stored with their scales, for fp8 linears; it is read once
        `before_load` has run). `transform` runs after the layout's own (e.g. a LoRA merge);
        the other hooks are from_pretrained's."""
        if source.layout == 'original':
            kwargs = cls.read_config(source.path)
        elif source.config_path is not None:
            from ..utils.formats import wan_kwargs_from_diffusers_config
            with open(source.config_path) as f:
                kwargs = wan_kwargs_from_diffusers_config(json.load(f))
            kwargs = {k: v for k, v in kwargs.items() if k not in cls.ignore_for_config}
        else:
            kwargs = dict(default_kwargs)
        model = build_on_meta(lambda: cls(**kwargs))
        if before_load is not None:
            before_load(model)
        tensors = source.iter_tensors()
        n = len(model.state_dict())
        if n > 100:  # a real expert: show progress over its ~1100 tensors
            from tqdm import tqdm
            tensors = tqdm(tensors, total=n, desc=f'loading {source.describe()}', unit='tensor')
        load_tensors_(model, tensors, source=source.path, device=device or 'cpu',
                      dtype=dtype_rule, rename=source.rename,
                      transform=chain(source.transform(
                          fp8_dtype, keep_fp8=False if fp8_keep is None else fp8_keep),
                          transform), place=place)
        model.freqs = model.freqs.to(device or 'cpu')
        return model.eval().requires_grad_(False)

    @classmethod
    def from_random(cls, seed: int = 0, device: torch.device | str = 'cpu',
                    dtype: Optional[torch.dtype] = None, *,
                    dtype_rule: Optional[DtypeRule] = None, place: Optional[Place] = None,
                    before_load: Optional[Callable[['WanModel'], None]] = None,
                    transform: Optional[Transform] = None,
                    **kwargs) -> 'WanModel':
        """Deterministic random weights, drawn directly on `device` (no host copy), each
        tensor in `dtype` or in the dtype `dtype_rule` gives it, then put where `place` says
        (default: stays on `device`); `before_load` edits the meta model first, as in
        from_pretrained. With `transform` the weights are drawn for the model as built and
        streamed through it as a checkpoint's would be (e.g. quantized to fp8 for linears
        that `before_load` swapped), so the same seed gives the same weights either way.

        The projections that write into the residual stream (attention outputs and the
        second FFN linear) are scaled by 1/sqrt(2 * num_layers), as in GPT-2-style inits, so
        that the stream stays well conditioned over 40 blocks: a trained network is not
        chaotic, and the agreement between the reference and optimized paths measured on
        random weights should reflect rounding, not a chaotic random map.
        """
        model = build_on_meta(lambda: cls(**kwargs))
        # the weights are drawn for the model as built, before `before_load` edits it
        drawn = build_on_meta(lambda: cls(**kwargs)) if transform is not None else model
        if before_load is not None:
            before_load(model)
        scale = 1.0 / math.sqrt(2 * model.num_layers)
        residual_writers = ('.self_attn.o.weight', '.cross_attn.o.weight', '.ffn.2.weight')

        def after_fill(name: str, t: torch.Tensor) -> None:
            if name.startswith('blocks.') and name.endswith(residual_writers):
                t.mul_(scale)

        load_tensors_(model, random_tensors(drawn, seed, device, dtype, dtype_rule, after_fill),
                      source='random weights', device=device, dtype=dtype_rule or dtype,
                      transform=transform, place=place)
        model.freqs = model.freqs.to(device)
        return model.eval().requires_grad_(False)

    def save_pretrained(self, folder: str, max_shard_bytes: int = 10 * 2**30) -> None:
        """Write config.json and safetensors shards (+ index) in the released layout."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'config.json'), 'w') as f:
            json.dump(self.config_dict(), f, indent=2)
        save_sharded_safetensors({k: v.detach().cpu() for k, v in self.state_dict().items()},
                                 folder, max_shard_bytes)
