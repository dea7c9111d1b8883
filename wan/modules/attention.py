"""The one attention entry point of the project, and the registry of attention kernels.

Every attention call (DiT self- and cross-attention, reference or optimized path, single GPU or
Ulysses) goes through `attention()`, which keeps upstream Wan2.2's semantics on every backend
(docs/MODEL.md#self-attention-and-rope):

- q, k, v are (B, L, heads, head_dim); non-half inputs are cast to `dtype` (bf16);
- queries are never trimmed; keys/values of sample b are trimmed to `k_lens[b]` (padded keys
  are excluded); `q_lens` trims queries when given (padded query rows then output zeros);
- softmax scale 1/sqrt(head_dim) unless given; non-causal; no dropout at inference;
- the output is (B, Lq, heads, head_dim) in q's original dtype.

Kernels are entries of `REGISTRY` (name -> `AttentionBackend`: availability check, whether it
needs CUDA, the dense call and the variable-length call):
- 'fa3':   FlashAttention-3, from `flash_attn_interface` (flash-attn's Hopper build) or the
           `fa3_fwd_interface` module of the `fa3-fwd` wheel;
- 'flash': FlashAttention-2 (`flash_attn`);
- 'cudnn': PyTorch SDPA restricted to its cuDNN backend;
- 'sdpa_flash': PyTorch SDPA restricted to its FlashAttention-2 backend;
- 'sdpa':  PyTorch SDPA, any backend PyTorch picks (the only choice on CPU).

Two policies resolve to a kernel name (`resolve_backend`), once per model by the pipeline:
'reference' is what upstream Wan2.2 would run on this machine (FA3 from `flash_attn_interface`,
else FA2, else -- upstream has no fallback -- SDPA's FlashAttention-2 backend on GPU and plain
SDPA on CPU); 'auto' is the first available kernel of `AUTO_ORDER`, fastest first. A call
with `backend=None` uses the 'reference' policy.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..utils.timing import Timer

__all__ = ['flash_attention', 'attention', 'available_backends', 'resolve_backend', 'LOSSY',
           'AttentionBackend', 'REGISTRY', 'BACKENDS', 'POLICIES', 'ATTENTION_CHOICES',
           'AUTO_ORDER', 'TIMED', 'time_backends', 'pick_kernels']

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


def _fp8_module():
    """wan.modules.fp8, imported when first needed (it imports this module)."""
    return _import('wan.modules.fp8')


def _fa3_fp8_dense(q, k, v, scale, causal):
    if causal:
        raise NotImplementedError('fa3_fp8 attention is non-causal only')
    return _fp8_module().fp8_attention(q, k, v, softmax_scale=scale)


def _sm80_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel: where it runs and how it is called.

    `dense(q, k, v, scale, causal)` attends over every key; `varlen(q, k, v, q_lens, k_lens,
    scale, causal)` trims keys (and queries, zero rows out) per sample. q/k/v are
    (B, L, H, D) in a half dtype; outputs (B, Lq, H, D).
    """
    name: str
    needs_cuda: bool
    available: Callable[[], bool]
    dense: Callable
    varlen: Callable
    note: str = ''


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
    kernel = REGISTRY[resolve_backend(backend, q.device)]
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

    if full_k and full_q:
        out = kernel.dense(q, k, v, softmax_scale, causal)
    else:
        out = kernel.varlen(q, k, v, None if full_q else q_lens, None if full_k else k_lens,
                            softmax_scale, causal)
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
    # FA3 builds differ: some return (out, lse), newer ones a single tensor.
    return x[0] if isinstance(x, (tuple, list)) else x


def _fa3_dense(q, k, v, scale, causal):
    return _first(_MODULES['fa3'].flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))


def _fa2_dense(q, k, v, scale, causal):
    return _MODULES['flash_attn'].flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)


def _fa3_varlen(q, k, v, q_lens, k_lens, scale, causal):
    return _flash_varlen('fa3', q, k, v, q_lens, k_lens, scale, causal)


def _fa2_varlen(q, k, v, q_lens, k_lens, scale, causal):
    return _flash_varlen('flash_attn', q, k, v, q_lens, k_lens, scale, causal)


def _flash_varlen(module, q, k, v, q_lens, k_lens, scale, causal):
    """Pack the trimmed samples, one varlen call, unpack to (B, Lq, H, D)."""
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
    out = _first(_MODULES[module].flash_attn_varlen_func(
        qp, kp, vp, cu_q, cu_k, lq, lk, softmax_scale=scale, causal=causal))
    # Unpack to (B, Lq, H, D); trimmed query rows (q_lens < Lq) are zeros.
    res = q.new_zeros(q.shape)
    for i, (start, n) in enumerate(zip(cu_q[:-1].tolist(), q_lens.tolist())):
        res[i, :n] = out[start:start + n]
    return res


def _sdpa_call(sdpa_backend: Optional[str], q, k, v, scale, causal):
    # SDPA wants (B, H, L, D).
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if sdpa_backend is None:
        out = F.scaled_dot_product_attention(*args, is_causal=causal, scale=scale)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, sdpa_backend)):
            out = F.scaled_dot_product_attention(*args, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _sdpa_varlen(sdpa_backend, q, k, v, q_lens, k_lens, scale, causal):
    # Trimmed keys: one call per sample keeps every fused kernel usable (no mask tensor).
    res = q.new_zeros(q.shape)
    lq, lk = q.shape[1], k.shape[1]
    for i in range(q.shape[0]):
        nq = lq if q_lens is None else int(q_lens[i])
        nk = lk if k_lens is None else int(k_lens[i])
        res[i:i + 1, :nq] = _sdpa_call(sdpa_backend, q[i:i + 1, :nq], k[i:i + 1, :nk],
                                       v[i:i + 1, :nk], scale, causal)
    return res


def _sdpa_entry(name: str, sdpa_backend: Optional[str], available, note: str):
    return AttentionBackend(
        name=name, needs_cuda=sdpa_backend is not None, available=available,
        dense=lambda q, k, v, scale, causal: _sdpa_call(sdpa_backend, q, k, v, scale, causal),
        varlen=lambda q, k, v, ql, kl, scale, causal: _sdpa_varlen(sdpa_backend, q, k, v, ql,
                                                                    kl, scale, causal),
        note=note)


REGISTRY: Dict[str, AttentionBackend] = {b.name: b for b in (
    AttentionBackend('fa3', True, lambda: torch.cuda.is_available() and
                     _fa3_module() is not None, _fa3_dense, _fa3_varlen,
                     'FlashAttention-3 (flash_attn_interface or the fa3-fwd wheel)'),
    AttentionBackend('flash', True, lambda: torch.cuda.is_available() and
                     _fa2_module() is not None, _fa2_dense, _fa2_varlen,
                     'FlashAttention-2 (flash_attn)'),
    _sdpa_entry('cudnn', 'CUDNN_ATTENTION',
                lambda: _sm80_or_newer() and torch.backends.cudnn.is_available(),
                "PyTorch SDPA, cuDNN backend"),
    _sdpa_entry('sdpa_flash', 'FLASH_ATTENTION', _sm80_or_newer,
                "PyTorch SDPA, FlashAttention-2 backend"),
    _sdpa_entry('sdpa', None, lambda: True, 'PyTorch SDPA, any backend (CPU too)'),
    # lossy, opt-in, never picked by 'auto': FA3's e4m3 kernel with per-(batch, head) scales
    # and mean-centred keys (wan/modules/fp8.py); padded keys (Ulysses rounding) take FA3's
    # bf16 varlen path
    AttentionBackend('fa3_fp8', True, lambda: _fp8_module().fp8_attention_available(),
                     _fa3_fp8_dense, _fa3_varlen,
                     'FlashAttention-3 fp8 (e4m3) forward: lossy, opt-in (Hopper)'),
)}
BACKENDS = tuple(REGISTRY)
POLICIES = ('auto', 'reference')
# every value --attention accepts
ATTENTION_CHOICES = POLICIES + BACKENDS
# 'auto' takes the first available, fastest first (FA3 > cuDNN > FA2 on Hopper); lossy
# kernels (fa3_fp8) are only ever chosen by name
AUTO_ORDER = ('fa3', 'cudnn', 'flash', 'sdpa_flash', 'sdpa')
LOSSY = ('fa3_fp8',)
# the exact kernels 'auto' times against each other on the real shapes (pick_kernels)
TIMED = ('fa3', 'cudnn', 'flash')


def available_backends() -> list[str]:
    """Exact kernels usable in this process, fastest first (lossy ones: `LOSSY`)."""
    return [name for name in AUTO_ORDER if REGISTRY[name].available()]


def resolve_backend(name: Optional[str], device: torch.device | str | None = None) -> str:
    """Turn a policy ('auto', 'reference'; None means 'reference') or a kernel name into a
    kernel usable on `device` (default: CUDA when present)."""
    name = name or 'reference'
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention backend '{name}'; choose from "
                         f"{', '.join(ATTENTION_CHOICES)}")
    on_cuda = torch.device(device).type == 'cuda' if device is not None else \
        torch.cuda.is_available()
    if not on_cuda:
        if name in POLICIES or not REGISTRY[name].needs_cuda:
            return 'sdpa'
        raise RuntimeError(f"attention backend '{name}' needs a CUDA device; use 'sdpa' on CPU")
    if name == 'reference':
        if _fa3_module(upstream_only=True) is not None:
            return 'fa3'
        if _fa2_module() is not None:
            return 'flash'
        return 'sdpa_flash' if REGISTRY['sdpa_flash'].available() else 'sdpa'
    if name == 'auto':
        return available_backends()[0]
    if not REGISTRY[name].available():
        raise RuntimeError(f"attention backend '{name}' is not available here; available: "
                           f"{', '.join(available_backends())}")
    return name


def time_backends(backends: Sequence[str], q_shape: Sequence[int], k_shape: Sequence[int],
                  device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                  calls: int = 3) -> Dict[str, float]:
    """Milliseconds per dense call of each kernel on random q and k/v of these (B, L, H, D)
    shapes, after one untimed call (kernel selection, autotuning). A kernel that fails at
    this shape (out of memory, or no kernel for it) is left out of the result, with a
    warning."""
    q = torch.randn(*q_shape, device=device, dtype=dtype)
    k, v = (torch.randn(*k_shape, device=device, dtype=dtype) for _ in range(2))
    timer = Timer(device)
    times: Dict[str, float] = {}
    for backend in backends:
        try:
            attention(q, k, v, backend=backend)
            runs: list = []
            with timer(runs):
                for _ in range(calls):
                    attention(q, k, v, backend=backend)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
            logging.warning('attention kernel %s left out at q %s, k %s: %s', backend,
                            tuple(q_shape), tuple(k_shape), str(exc).splitlines()[0][:200])
            continue
        times[backend] = runs[0] * 1e3 / calls
    return times


def pick_kernels(batch: int, tokens: int, heads: int, head_dim: int, text_len: int,
                 device: torch.device | str, sp_size: int = 1
                 ) -> Optional[Tuple[Dict[str, str], Dict[str, Dict[str, float]]]]:
    """The fastest of the installed `TIMED` kernels for a DiT forward's two attention
    shapes, timed on `device`: 'self' (every token against every token) and 'cross' (the
    tokens against `text_len` text keys). Under Ulysses (`sp_size` ranks) a rank's
    self-attention sees every token with its share of the heads, its cross-attention its
    share of the tokens with every head. Returns ({'self': name, 'cross': name}, the
    milliseconds per call of each), or None where fewer than two kernels could be timed."""
    if torch.device(device).type != 'cuda':
        return None
    candidates = [b for b in TIMED if b in available_backends()]
    if len(candidates) < 2:
        return None
    shapes = {'self': ((batch, tokens, heads // sp_size, head_dim),) * 2,
              'cross': ((batch, tokens // sp_size, heads, head_dim),
                        (batch, text_len, heads, head_dim))}
    picks, report = {}, {}
    for kind, (q_shape, k_shape) in shapes.items():
        times = time_backends(candidates, q_shape, k_shape, device)
        picks[kind] = min(times, key=times.get) if times else candidates[0]
        report[kind] = {k: round(v, 3) for k, v in times.items()}
    return picks, report
