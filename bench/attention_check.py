"""Self-attention kernels at the A14B shapes, one process: where the attention time can go.

    python bench/attention_check.py --sizes 832*480 1280*720 --output attention.json

Self-attention takes about two thirds of a 1280*720 forward, and FA3's measured rate drops
from ~717 TFLOP/s at 32,760 tokens to ~658 at 75,600 while its fp8 kernel (half the bytes
of K and V) does not drop. This diagnostic times, on random q/k/v of one forward's shape
(batch 1, 40 heads x 128), every exact kernel installed and the exact variants that could
win back the loss:

- `fa3`, `cudnn`, `flash`, `sdpa_flash`: the registry's kernels, dense call;
- `fa3_splits{N}`: FA3 with its own split-KV (`num_splits=N`: N chunks of the keys, fp32
  partial results combined in the kernel's epilogue) where the FA3 build takes the argument;
- `fa3_kv_halves`: two FA3 calls on the two halves of the keys, combined by their
  log-sum-exp in fp32 (a compiled elementwise kernel);
- `fa3_fused_qkv`: FA3 on q, k, v viewed out of one (B, L, 3, H, D) buffer, the layout a
  fused q/k/v projection would hand the kernel (strided tokens);
- `fa3_fp8` (lossy, for scale only).

And the q/k/v projections before it: three GEMMs against one on the concatenated weights
(what fusing them at load would change); and the kernel `auto` resolves to, timed call by
call back to back and with a block's FFN GEMMs between the calls (attention measured inside
the model has run slower than standalone: this tells the GPU's state from the call's inputs).

Per variant and size: the median seconds per call, TFLOP/s, the output's relative error
against `fa3` (or the first exact kernel), and the extra peak memory of the call. A
diagnostic: nothing here is a test, and no variant becomes a default because of it alone.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.schema import write_json_atomic  # noqa: E402
from wan.configs import SIZE_CONFIGS, WAN_CONFIGS  # noqa: E402
from wan.utils.timing import Timer  # noqa: E402

# the module, not the function wan.modules exports under the same name
attn_mod = importlib.import_module('wan.modules.attention')
GiB = 2**30


def tokens_for(size: str, frames: int) -> int:
    w, h = SIZE_CONFIGS[size]
    return ((frames - 1) // 4 + 1) * (h // 16) * (w // 16)


def _fa3_call(q, k, v, **kw):
    return attn_mod._MODULES['fa3'].flash_attn_func(q, k, v, **kw)


def _lse_merge(o1, l1, o2, l2):
    """Two partial attentions (B, L, H, D) over disjoint keys with their log-sum-exps
    (B, H, L) merged into the attention over all keys."""
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(l2 - lse).transpose(1, 2).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype)


def variants(device: torch.device, qkv: torch.Tensor) -> Dict[str, Callable]:
    """Name -> f(q, k, v) for what this process can run; `qkv` is the (B, L, 3, H, D)
    buffer q, k, v were copied from (the fused layout)."""
    out: Dict[str, Callable] = {}
    for name in attn_mod.available_backends():
        out[name] = lambda q, k, v, _n=name: attn_mod.attention(q, k, v, backend=_n)
    if 'fa3' not in out:
        return out
    params = inspect.signature(attn_mod._MODULES['fa3'].flash_attn_func).parameters
    if 'num_splits' in params:
        for n in (2, 3, 4):
            out[f'fa3_splits{n}'] = lambda q, k, v, _n=n: attn_mod._first(
                _fa3_call(q, k, v, num_splits=_n))
    if 'return_attn_probs' in params:
        merge = torch.compile(_lse_merge, dynamic=False) if device.type == 'cuda' \
            else _lse_merge

        def kv_halves(q, k, v):
            half = k.shape[1] // 2
            o1, l1 = _fa3_call(q, k[:, :half], v[:, :half], return_attn_probs=True)[:2]
            o2, l2 = _fa3_call(q, k[:, half:], v[:, half:], return_attn_probs=True)[:2]
            return merge(o1, l1, o2, l2)
        out['fa3_kv_halves'] = kv_halves

    out['fa3_fused_qkv'] = lambda q, k, v: attn_mod.attention(*qkv.unbind(2), backend='fa3')
    if attn_mod.REGISTRY['fa3_fp8'].available():
        out['fa3_fp8'] = lambda q, k, v: attn_mod.attention(q, k, v, backend='fa3_fp8')
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def measure(size: str, tokens: int, heads: int, head_dim: int, device: torch.device,
            reps: int, dtype: torch.dtype) -> Dict[str, Any]:
    gen = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(1, tokens, 3, heads, head_dim, device=device, dtype=dtype,
                      generator=gen)
    q, k, v = (u.contiguous() for u in qkv.unbind(2))
    flops = 4 * tokens * tokens * heads * head_dim
    timer = Timer(device)
    res: Dict[str, Any] = {'tokens': tokens, 'variants': {}}
    ref = None
    for name, fn in variants(device, qkv).items():
        try:
            y = fn(q, k, v)  # first call: kernel selection, compile of the merge
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
                del y
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            times: List[float] = []
            for _ in range(reps):
                with timer(times):
                    y = fn(q, k, v)
            extra = (torch.cuda.max_memory_allocated(device) - base) / GiB \
                if device.type == 'cuda' else None
        except Exception as exc:  # a kernel or an argument this build lacks
            res['variants'][name] = {'error': repr(exc)[:300]}
            print(f'{size:<10}{name:<16}error: {repr(exc)[:120]}')
            continue
        if ref is None and name not in attn_mod.LOSSY:
            ref = y.float()
        seconds = statistics.median(times)
        row = {'seconds': seconds, 'tflops': flops / seconds / 1e12,
               'rel_err_vs_first_exact': rel(y, ref), 'extra_peak_gib': extra}
        res['variants'][name] = row
        print(f"{size:<10}{name:<16}{seconds * 1e3:9.2f} ms {row['tflops']:8.1f} TFLOP/s "
              f"rel err {row['rel_err_vs_first_exact']:.2e}"
              + (f' +{extra:.2f} GiB' if extra is not None else ''))
        del y
    return res


def measure_qkv_projection(tokens: int, dim: int, device: torch.device, reps: int,
                           dtype: torch.dtype) -> Dict[str, Any]:
    """The q/k/v projections of self-attention as three (tokens x dim) @ (dim x dim) GEMMs
    against one GEMM with the three weights concatenated (dim x 3 dim): seconds per call
    and the largest difference of the outputs (the same dot products; the GEMM kernel may
    block them differently)."""
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, generator=gen)
    ws = [torch.randn(dim, dim, device=device, dtype=dtype, generator=gen) / dim ** 0.5
          for _ in range(3)]
    bs = [torch.randn(dim, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    w_cat, b_cat = torch.cat(ws), torch.cat(bs)
    F = torch.nn.functional

    def separate():
        return [F.linear(x, w, b) for w, b in zip(ws, bs)]

    def fused():
        return F.linear(x, w_cat, b_cat).split(dim, dim=-1)
    timer = Timer(device)
    res: Dict[str, Any] = {'tokens': tokens, 'dim': dim}
    for name, fn in (('separate', separate), ('fused', fused)):
        fn()
        times: List[float] = []
        for _ in range(reps):
            with timer(times):
                fn()
        seconds = statistics.median(times)
        res[name] = {'seconds': seconds, 'tflops': 3 * 2 * tokens * dim * dim / seconds / 1e12}
    res['max_abs_diff'] = max(float((a.float() - b.float()).abs().max())
                              for a, b in zip(separate(), fused()))
    res['fused_over_separate'] = res['fused']['seconds'] / res['separate']['seconds']
    print(f"q/k/v projection at {tokens} tokens: separate {res['separate']['seconds'] * 1e3:.2f}"
          f" ms, fused {res['fused']['seconds'] * 1e3:.2f} ms "
          f"({res['fused_over_separate']:.3f}x), max abs diff {res['max_abs_diff']:.2e}")
    return res


def measure_between_gemms(tokens: int, heads: int, head_dim: int, ffn_dim: int,
                          device: torch.device, reps: int, dtype: torch.dtype
                          ) -> Dict[str, Any]:
    """The exact kernel 'auto' resolves to, timed call by call (CUDA events around the
    attention call only) back to back, and with a block's FFN GEMMs (tokens x dim x ffn_dim,
    both directions) running between the calls, as inside the model. A slower attention in
    the second case is the GPU's state (clocks, power, caches) after heavy GEMMs, not
    anything the attention call is handed."""
    backend = attn_mod.resolve_backend('auto', device)
    dim = heads * head_dim
    gen = torch.Generator(device).manual_seed(2)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype,
                           generator=gen) for _ in range(3))
    x = torch.randn(tokens, dim, device=device, dtype=dtype, generator=gen)
    w1 = torch.randn(ffn_dim, dim, device=device, dtype=dtype, generator=gen) / dim ** 0.5
    w2 = torch.randn(dim, ffn_dim, device=device, dtype=dtype, generator=gen) / ffn_dim ** 0.5
    F = torch.nn.functional
    timer = Timer(device)
    res: Dict[str, Any] = {'backend': backend, 'tokens': tokens, 'ffn_dim': ffn_dim}
    for name, gemms in (('back_to_back', False), ('between_gemms', True)):
        attn_mod.attention(q, k, v, backend=backend)
        times: List[float] = []
        for _ in range(reps):
            if gemms:
                F.linear(F.linear(x, w1), w2)
            with timer(times):
                attn_mod.attention(q, k, v, backend=backend)
        res[name] = statistics.median(times)
    res['between_over_back_to_back'] = res['between_gemms'] / res['back_to_back']
    print(f"{backend} at {tokens} tokens: back to back {res['back_to_back'] * 1e3:.2f} ms, "
          f"between GEMMs {res['between_gemms'] * 1e3:.2f} ms "
          f"({res['between_over_back_to_back']:.3f}x)")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sizes', nargs='+', default=['832*480', '1280*720'],
                   choices=sorted(SIZE_CONFIGS))
    p.add_argument('--frames', type=int, default=81)
    p.add_argument('--reps', type=int, default=8)
    p.add_argument('--tiny', action='store_true',
                   help='a few tokens and heads on the CPU (smoke test)')
    p.add_argument('--output', default=None)
    args = p.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print('bench/attention_check.py needs a CUDA GPU (or --tiny)')
        return 2
    cfg = WAN_CONFIGS['t2v-A14B']
    device = torch.device('cpu' if args.tiny else 'cuda')
    heads, head_dim = (2, 16) if args.tiny else (cfg.num_heads, cfg.dim // cfg.num_heads)
    out: Dict[str, Any] = {
        'gpu': torch.cuda.get_device_name() if device.type == 'cuda' else None,
        'torch': torch.__version__, 'frames': args.frames, 'heads': heads,
        'head_dim': head_dim, 'batch': 1, 'reps': args.reps,
        'git_commit': os.environ.get('GIT_COMMIT'),
        'command': ' '.join([os.path.basename(sys.executable), *sys.argv]), 'sizes': {}}
    for size in args.sizes:
        tokens = 96 if args.tiny else tokens_for(size, args.frames)
        dtype = torch.float32 if args.tiny else torch.bfloat16
        out['sizes'][size] = measure(size, tokens, heads, head_dim, device, args.reps, dtype)
        out['sizes'][size]['qkv_projection'] = measure_qkv_projection(
            tokens, heads * head_dim, device, args.reps, dtype)
        out['sizes'][size]['attention_between_gemms'] = measure_between_gemms(
            tokens, heads, head_dim, 64 if args.tiny else cfg.ffn_dim, device, args.reps,
            dtype)
        if args.output:
            write_json_atomic(args.output, out)
    if not args.output:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
