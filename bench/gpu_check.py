"""GPU check of the exact optimizations against the reference forward (a script, seconds).

    python bench/gpu_check.py                    # on a GPU; exit 1 if a check fails
    python bench/gpu_check.py --output check.json
    python bench/gpu_check.py --cpu              # the checks that run on a CPU (no compile)

A small WanModel (A14B's head_dim 128 and text width 4096, a few blocks, random weights) runs
each optimization beside the reference forward on the same inputs, and each relative error
(|out - ref| / |ref|, Frobenius norms) is held to the tolerance of its kind:

- same math in fp32 (`per_sample_time`, `fast_rope`, batched CFG as one batch-2 forward
  against two batch-1 forwards): fp32 rounding only, `TOL_FP32`;
- `compile` (regional, per block) against the same options in eager mode, fp32: inductor
  may reorder fp32 reductions, `TOL_COMPILE`;
- attention kernels (each available one, and the full optimized configuration) under bf16
  autocast against the reference forward under bf16 autocast: the bf16 rounding of a
  different kernel, `TOL_BF16`.

Also the attention function alone, each kernel against fp32 SDPA, with and without padded
keys. The model's inputs have a padded sequence (seq_len > tokens) and two text contexts of
different lengths, so that the masking paths run too.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan.modules.attention import attention, available_backends, resolve_backend  # noqa: E402
from wan.modules.model import ForwardOptions, WanModel  # noqa: E402

TOL_FP32 = 1e-5
TOL_COMPILE = 1e-4
TOL_BF16 = 2e-2
# A14B's head_dim (5120 / 40) and text width, at a few blocks
MODEL = dict(dim=512, ffn_dim=1024, num_heads=4, num_layers=3, text_dim=4096)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Checks:
    """The list of (name, relative error, tolerance) results, printed as they come."""

    def __init__(self):
        self.rows: List[Dict[str, object]] = []

    def add(self, name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        err = rel(out, ref)
        ok = err <= tol  # NaN fails
        self.rows.append({'check': name, 'rel_err': err, 'tolerance': tol, 'ok': ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name:<58} rel err {err:.2e} (tolerance {tol:.0e})",
              flush=True)

    @property
    def failed(self) -> List[str]:
        return [r['check'] for r in self.rows if not r['ok']]


def _inputs(device: torch.device, text_dim: int):
    g = torch.Generator(device='cpu').manual_seed(0)
    lat = torch.randn(16, 3, 16, 24, generator=g).to(device)  # 3 x 8 x 12 = 288 tokens
    ctx = torch.randn(20, text_dim, generator=g).to(device)
    ctx_null = torch.randn(13, text_dim, generator=g).to(device)
    return lat, ctx, ctx_null, 300  # seq_len 300: 12 padded positions


def _forward(model, opts: ForwardOptions, lats, ts, ctxs, seq_len, autocast: bool):
    model.set_options(opts)
    device = lats[0].device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(lats, t=torch.tensor(ts, device=device), context=ctxs, seq_len=seq_len)


def check_attention_kernels(checks: Checks, device: torch.device) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 128, device=device) for _ in range(3))
    k_lens = torch.tensor([300, 217], device=device)
    ref = attention(q, k, v, k_lens=k_lens, dtype=torch.float32, backend='sdpa')
    dense = attention(q, k, v, dtype=torch.float32, backend='sdpa')
    for b in available_backends():
        checks.add(f'attention {b}, padded keys vs fp32 sdpa',
                   attention(q, k, v, k_lens=k_lens, backend=b), ref, TOL_BF16)
        checks.add(f'attention {b}, dense vs fp32 sdpa', attention(q, k, v, backend=b), dense,
                   TOL_BF16)


def check_model(checks: Checks, device: torch.device, compile_blocks: bool) -> Dict[str, float]:
    model = WanModel.from_random(seed=0, device=device, dtype=torch.float32, **MODEL)
    model.eval().requires_grad_(False)
    lat, ctx, ctx_null, seq_len = _inputs(device, MODEL['text_dim'])
    timings: Dict[str, float] = {}

    # fp32, no autocast: exact-math toggles must agree to fp32 rounding
    fp32 = dict(attn_backend='sdpa', attn_dtype=torch.float32)
    for t in (900, 100):
        ref = _forward(model, ForwardOptions(**fp32), [lat], [t], [ctx], seq_len, False)[0]
        for toggles in (dict(per_sample_time=True), dict(fast_rope=True),
                        dict(per_sample_time=True, fast_rope=True)):
            out = _forward(model, ForwardOptions(**fp32, **toggles), [lat], [t], [ctx], seq_len,
                           False)[0]
            checks.add(f"fp32 {'+'.join(toggles)} vs reference, t={t}", out, ref, TOL_FP32)
    exact = ForwardOptions(**fp32, per_sample_time=True, fast_rope=True)
    for opts, label in ((ForwardOptions(**fp32), 'reference'), (exact, 'optimized')):
        one = [_forward(model, opts, [lat], [900], [c], seq_len, False)[0] for c in (ctx, ctx_null)]
        two = _forward(model, opts, [lat, lat], [900, 900], [ctx, ctx_null], seq_len, False)
        for i, name in enumerate(('cond', 'uncond')):
            checks.add(f'fp32 batched CFG ({label} options), {name} vs batch 1', two[i], one[i],
                       TOL_FP32)

    # bf16 autocast (the production numerics): a kernel swap is bf16 rounding
    ref_kernel = resolve_backend('reference', device)
    ref16 = _forward(model, ForwardOptions(attn_backend=ref_kernel), [lat], [900], [ctx], seq_len,
                     True)[0]
    for b in available_backends():
        out = _forward(model, ForwardOptions(attn_backend=b), [lat], [900], [ctx], seq_len,
                       True)[0]
        checks.add(f'bf16 attention {b} vs reference ({ref_kernel})', out, ref16, TOL_BF16)
    best = resolve_backend('auto', device)
    optimized16 = ForwardOptions(attn_backend=best, per_sample_time=True, fast_rope=True)
    out = _forward(model, optimized16, [lat], [900], [ctx], seq_len, True)[0]
    checks.add(f'bf16 optimized ({best}, per_sample_time, fast_rope) vs reference', out, ref16,
               TOL_BF16)

    if compile_blocks:
        compiled = copy.deepcopy(model)
        for block in compiled.blocks:
            block.compile(dynamic=False)
        eager = _forward(model, exact, [lat], [900], [ctx], seq_len, False)[0]
        t0 = time.perf_counter()
        out = _forward(compiled, exact, [lat], [900], [ctx], seq_len, False)[0]
        torch.cuda.synchronize()
        timings['compile_seconds'] = time.perf_counter() - t0
        checks.add('fp32 compiled blocks vs eager (optimized options)', out, eager, TOL_COMPILE)
        two = _forward(compiled, exact, [lat, lat], [900, 900], [ctx, ctx_null], seq_len, False)
        checks.add('fp32 compiled blocks, batch 2 cond vs eager batch 1', two[0], eager,
                   TOL_COMPILE)
        eager16 = _forward(model, optimized16, [lat], [900], [ctx], seq_len, True)[0]
        out16 = _forward(compiled, optimized16, [lat], [900], [ctx], seq_len, True)[0]
        checks.add('bf16 compiled blocks vs eager (optimized options)', out16, eager16,
                   TOL_BF16)
    return timings


def run_checks(device: torch.device, compile_blocks: Optional[bool] = None) -> Dict[str, object]:
    """Every check on `device` (compile only on CUDA by default); the summary dict."""
    compile_blocks = device.type == 'cuda' if compile_blocks is None else compile_blocks
    out: Dict[str, object] = {'torch': torch.__version__, 'device': str(device),
                              'gpu': torch.cuda.get_device_name(device)
                              if device.type == 'cuda' else None,
                              'backends': available_backends()}
    print(out, flush=True)
    checks = Checks()
    check_attention_kernels(checks, device)
    out.update(check_model(checks, device, compile_blocks))
    out['checks'] = checks.rows
    out['failed'] = checks.failed
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--cpu', action='store_true', help='run on the CPU (no compile check)')
    p.add_argument('--output', default=None, help='JSON path')
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print('error: no CUDA device (use --cpu for the checks that run on a CPU)',
              file=sys.stderr)
        return 2
    out = run_checks(torch.device('cpu' if args.cpu else 'cuda'))
    if args.output:
        from bench.schema import write_json_atomic
        write_json_atomic(args.output, out)
    print(f"{len(out['checks']) - len(out['failed'])}/{len(out['checks'])} checks passed"
          + (f"; failed: {', '.join(out['failed'])}" if out['failed'] else ''), flush=True)
    return 1 if out['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
