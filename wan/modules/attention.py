"""The one attention entry point of the project.

Every attention call (DiT self- and cross-attention, reference or optimized path, single GPU or
Ulysses) goes through `attention()`, which keeps the reference semantics on every backend
(REFERENCE.md §2.5):

- q, k, v are (B, L, heads, head_dim); non-half inputs are cast to `dtype` (bf16);
- queries are never trimmed; keys/values of sample b are trimmed to `k_lens[b]` (padded keys
  are excluded); `q_lens` trims queries when given (padded query rows then output zeros);
- softmax scale 1/sqrt(head_dim) unless given; non-causal; no dropout at inference;
- the output is (B, Lq, heads, head_dim) in q's original dtype.

Backends (name: implementation):
- 'fa3':   FlashAttention-3, from `flash_attn_interface` (flash-attn's Hopper build) or the
           `fa3_fwd_interface` module of the `fa3-fwd` wheel;
- 'flash': FlashAttention-2 (`flash_attn`);
- 'cudnn': PyTorch SDPA restricted to its cuDNN backend;
- 'sdpa_flash': PyTorch SDPA restricted to its FlashAttention-2 backend;
- 'sdpa':  PyTorch SDPA, any backend PyTorch picks (the only choice on CPU).

`backend=None` resolves through `set_default_backend()`; the reference path picks
`REFERENCE_BACKEND` ('reference'): what upstream Wan2.2 would run on this machine (FA3 from
`flash_attn_interface`, else FA2, else -- upstream has no fallback -- SDPA's FlashAttention-2
backend on GPU and plain SDPA on CPU). 'auto' picks the fastest available kernel.
"""
from __future__ import annotations

import importlib
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ['flash_attention', 'attention', 'available_backends', 'resolve_backend',
           'set_default_backend', 'get_default_backend', 'BACKENDS']

BACKENDS = ('fa3', 'flash', 'cudnn', 'sdpa_flash', 'sdpa')
# Order used by 'auto': fastest first (PERFORMANCE.md: FA3 712, cuDNN 581, FA2 365 TFLOP/s).
_AUTO_ORDER = ('fa3', 'cudnn', 'flash', 'sdpa_flash', 'sdpa')

_default_backend = 'reference'


# Kernel modules found so far, by name. Plain module globals (not an lru_cache) so that
# torch.compile treats them as constants inside compiled blocks.
_MODULES: dict = {}


def _import(name: str):
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(name)
        except Exception:  # ImportError, or a build that fails to load its CUDA library
            _MODULES[name] = None
    return _MODULES[name]


def _fa3_module(upstream_only: bool = False):
    """The FA3 interface module, or None. Upstream Wan only knows `flash_attn_interface`."""
    names = ('flash_attn_interface',) if upstream_only else ('flash_attn_interface',
                                                              'fa3_fwd_interface')
    for name in names:
        if _import(name) is not None:
            _MODULES['fa3'] = _MODULES[name]
            return _MODULES[name]
    return None


def _fa2_module():
    mod = _import('flash_attn')
    if mod is None or not str(getattr(mod, '__version__', '0')).startswith('2'):
        return None
    return mod


def _sdpa_backend_ok(name: str) -> bool:
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    if name == 'cudnn':
        return major >= 8 and torch.backends.cudnn.is_available()
    return major >= 8  # sdpa_flash


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first."""
    found = []
    for name in _AUTO_ORDER:
        if name == 'fa3' and torch.cuda.is_available() and _fa3_module() is not None:
            found.append(name)
        elif name == 'flash' and torch.cuda.is_available() and _fa2_module() is not None:
            found.append(name)
        elif name in ('cudnn', 'sdpa_flash') and _sdpa_backend_ok(name):
            found.append(name)
        elif name == 'sdpa':
            found.append(name)
    return found


def resolve_backend(name: Optional[str], device: torch.device | str | None = None) -> str:
    """Turn 'auto', 'reference' or a backend name into a backend usable on `device`."""
    name = name or _default_backend
    on_cuda = torch.device(device).type == 'cuda' if device is not None else \
        torch.cuda.is_available()
    if not on_cuda:
        if name in ('auto', 'reference', 'sdpa'):
            return 'sdpa'
        raise RuntimeError(f"attention backend '{name}' needs a CUDA device; use 'sdpa' on CPU")
    if name == 'reference':
        if _fa3_module(upstream_only=True) is not None:
            return 'fa3'
        if _fa2_module() is not None:
            return 'flash'
        return 'sdpa_flash' if _sdpa_backend_ok('sdpa_flash') else 'sdpa'
    if name == 'auto':
        return available_backends()[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choose from "
                         f"{('auto', 'reference') + BACKENDS}")
    if name not in available_backends():
        raise RuntimeError(f"attention backend '{name}' is not available here; available: "
                           f"{available_backends()}")
    return name


def set_default_backend(name: str) -> str:
    """Set the process-wide backend used when `attention(backend=None)`; returns it resolved."""
    global _default_backend
    if name not in ('auto', 'reference') + BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'")
    _default_backend = name
    resolved = resolve_backend(name)
    logging.info('attention backend: %s (%s)', resolved, name)
    return resolved


def get_default_backend() -> str:
    return _default_backend


def attention(q: torch.Tensor,
              k: torch.Tensor,
              v: torch.Tensor,
              q_lens: Optional[torch.Tensor] = None,
              k_lens: Optional[torch.Tensor] = None,
              dropout_p: float = 0.,
              softmax_scale: Optional[float] = None,
              q_scale: Optional[float] = None,
              causal: bool = False,
              window_size: Sequence[int] = (-1, -1),
              deterministic: bool = False,
              dtype: torch.dtype = torch.bfloat16,
              fa_version: Optional[int] = None,
              *,
              backend: Optional[str] = None) -> torch.Tensor:
    """Attention with the reference's varlen semantics on the chosen backend (module docstring).

    `fa_version` (3 or 2), as in the reference, forces the FlashAttention generation.
    """
    if dropout_p:
        raise ValueError('dropout is not supported at inference')
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError('windowed attention is not used by Wan2.2 T2V')
    if fa_version is not None:
        backend = {3: 'fa3', 2: 'flash'}[fa_version]
    backend = resolve_backend(backend, q.device)
    out_dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    if q.dtype not in half:
        q = q.to(dtype)
    if k.dtype not in half:
        k = k.to(dtype)
    if v.dtype not in half:
        v = v.to(dtype)
    if q_scale is not None:
        q = q * q_scale
    lq, lk = q.shape[1], k.shape[1]
    full_k = k_lens is None or bool((k_lens == lk).all())
    full_q = q_lens is None or bool((q_lens == lq).all())

    if backend in ('fa3', 'flash'):
        if full_k and full_q:
            out = _flash_dense(backend, q, k, v, softmax_scale, causal)
        else:
            out = _flash_varlen(backend, q, k, v, q_lens, k_lens, softmax_scale, causal)
    else:
        out = _sdpa(backend, q, k, v, q_lens if not full_q else None,
                    k_lens if not full_k else None, softmax_scale, causal)
    return out.to(out_dtype)


def flash_attention(q: torch.Tensor,
                    k: torch.Tensor,
                    v: torch.Tensor,
                    q_lens: Optional[torch.Tensor] = None,
                    k_lens: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.,
                    softmax_scale: Optional[float] = None,
                    q_scale: Optional[float] = None,
                    causal: bool = False,
                    window_size: Sequence[int] = (-1, -1),
                    deterministic: bool = False,
                    dtype: torch.dtype = torch.bfloat16,
                    version: Optional[int] = None,
                    *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """The reference's name for the same function (`version` selects FA3 or FA2)."""
    return attention(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, q_scale, causal,
                     window_size, deterministic, dtype, version, backend=backend)


def _first(x):
    # FA3 builds differ: some return (out, lse), newer ones a single tensor (REFERENCE.md §2.5).
    return x[0] if isinstance(x, (tuple, list)) else x


def _flash_dense(backend, q, k, v, scale, causal):
    if backend == 'fa3':
        return _first(_MODULES['fa3'].flash_attn_func(q, k, v, softmax_scale=scale,
                                                      causal=causal))
    return _MODULES['flash_attn'].flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)


def _flash_varlen(backend, q, k, v, q_lens, k_lens, scale, causal):
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    dev = q.device
    if q_lens is None:
        q_lens = torch.full((b,), lq, dtype=torch.int32, device=dev)
    if k_lens is None:
        k_lens = torch.full((b,), lk, dtype=torch.int32, device=dev)
    q_lens, k_lens = q_lens.to(dev, torch.int32), k_lens.to(dev, torch.int32)
    qp = torch.cat([u[:n] for u, n in zip(q, q_lens.tolist())])
    kp = torch.cat([u[:n] for u, n in zip(k, k_lens.tolist())])
    vp = torch.cat([u[:n] for u, n in zip(v, k_lens.tolist())])
    cu_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    if backend == 'fa3':
        out = _first(_MODULES['fa3'].flash_attn_varlen_func(
            qp, kp, vp, cu_q, cu_k, lq, lk, softmax_scale=scale, causal=causal))
    else:
        out = _MODULES['flash_attn'].flash_attn_varlen_func(
            qp, kp, vp, cu_q, cu_k, lq, lk, softmax_scale=scale, causal=causal)
    # Unpack to (B, Lq, H, D); trimmed query rows (q_lens < Lq) are zeros.
    res = q.new_zeros(q.shape)
    for i, (start, n) in enumerate(zip(cu_q[:-1].tolist(), q_lens.tolist())):
        res[i, :n] = out[start:start + n]
    return res


_SDPA_BACKENDS = {
    'cudnn': 'CUDNN_ATTENTION',
    'sdpa_flash': 'FLASH_ATTENTION',
}


def _sdpa_call(backend, q, k, v, scale, causal):
    # SDPA wants (B, H, L, D).
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if backend in _SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[backend])):
            out = F.scaled_dot_product_attention(*args, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(*args, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _sdpa(backend, q, k, v, q_lens, k_lens, scale, causal):
    if q_lens is None and k_lens is None:
        return _sdpa_call(backend, q, k, v, scale, causal)
    # Trimmed keys: one call per sample keeps every fused kernel usable (no mask tensor).
    res = q.new_zeros(q.shape)
    lq, lk = q.shape[1], k.shape[1]
    for i in range(q.shape[0]):
        nq = lq if q_lens is None else int(q_lens[i])
        nk = lk if k_lens is None else int(k_lens[i])
        res[i:i + 1, :nq] = _sdpa_call(backend, q[i:i + 1, :nq], k[i:i + 1, :nk],
                                       v[i:i + 1, :nk], scale, causal)
    return res
