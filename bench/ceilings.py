"""What the hardware allows: FLOPs of one DiT forward, the measured bf16 GEMM rate and
attention kernels at the run's sequence length, and from them the floor of one forward.

The floor per forward = num_layers x (the fastest measured self-attention at this length) +
GEMM FLOPs / (measured bf16 GEMM rate). A denoising step runs two forwards (CFG).
"""
from __future__ import annotations

import statistics
from typing import Dict, Optional

import torch

from wan.utils.timing import Timer

from .schema import Ceilings, Floor

__all__ = ['GEMM_SIZE', 'forward_flops', 'measure_ceilings', 'floor_per_forward']

# the square bf16 GEMM whose rate stands for "the GPU's GEMM rate"
GEMM_SIZE = 8192


def forward_flops(cfg, tokens: int) -> Dict[str, float]:
    """FLOPs of one DiT forward at `tokens` self-attention tokens (text_len context)."""
    d, f, n, ctx = cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.text_len
    gemm = n * (12 * tokens * d * d + 4 * tokens * d * f + 4 * ctx * d * d)
    attn = n * 4 * tokens * tokens * d
    cross = n * 4 * tokens * ctx * d
    return {'gemm': float(gemm), 'self_attention': float(attn), 'cross_attention': float(cross),
            'total': float(gemm + attn + cross)}


def measure_ceilings(cfg, tokens: int, device: torch.device, reps: int = 5) -> Ceilings:
    """bf16 GEMM rate and each available attention kernel's time at this size (GPU only;
    on the CPU both stay unmeasured)."""
    from wan.modules.attention import attention, available_backends
    out: Ceilings = {'gemm_bf16_tflops': None, 'attention': {}}
    if device.type != 'cuda':
        return out
    timer = Timer(device)
    n = GEMM_SIZE
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times: list = []
    for _ in range(reps * 2):
        with timer(times):
            a @ b
    out['gemm_bf16_tflops'] = 2 * n**3 / statistics.median(times) / 1e12
    del a, b
    h, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    q, k, v = (torch.randn(1, tokens, h, hd, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    flops = 4 * tokens * tokens * h * hd
    for backend in available_backends():
        try:
            attention(q, k, v, backend=backend)
            times = []
            for _ in range(reps):
                with timer(times):
                    attention(q, k, v, backend=backend)
            t = statistics.median(times)
            out['attention'][backend] = {'seconds': t, 'tflops': flops / t / 1e12}
        except Exception as exc:  # a kernel that is importable but fails at this shape
            out['attention'][backend] = {'error': repr(exc)[:200]}
    del q, k, v
    torch.cuda.empty_cache()
    return out


def floor_per_forward(cfg, tokens: int, ceilings: Ceilings) -> Optional[Floor]:
    """The fastest a forward can be with the measured kernels (None if unmeasured)."""
    ok = {k: v['seconds'] for k, v in ceilings['attention'].items() if 'seconds' in v}
    if not ok or not ceilings['gemm_bf16_tflops']:
        return None
    best = min(ok, key=ok.get)
    gemm_s = forward_flops(cfg, tokens)['gemm'] / (ceilings['gemm_bf16_tflops'] * 1e12)
    attn_s = cfg.num_layers * ok[best]
    return {'attention_kernel': best, 'attention_seconds': attn_s, 'gemm_seconds': gemm_s,
            'seconds': attn_s + gemm_s}
