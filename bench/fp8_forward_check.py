"""fp8 variants of one A14B expert forward against bf16: speed and error (a diagnostic).

    python bench/fp8_forward_check.py --size 1280*720 --output fp8_forward.json \
        --variants bf16 attn ffn ffn+attn_proj all all+attn

One model of A14B widths, random bf16 weights ('matmul' dtype policy), the optimized forward
options (per-sample time, fp32 RoPE, compiled blocks), batch 1, 512 text tokens. Variants run
in the order given on the same weights: `bf16` (the exact path), then fp8 block linears for
the named parts (`ffn`, `attn_proj`, `cross_attn`, `all`, joined with '+'; the swap is one
way, so each variant's parts must include the previous one's), with `+attn` for FA3's fp8
self-attention (`fa3_fp8`; cross-attention stays on the exact kernel). Per variant: the median
seconds per forward after a warm-up (recompile included), the ratio to bf16, the activation
peak and the relative error of the predicted velocity against the bf16 variant's. Random
weights: the trained model's sensitivity to fp8 is not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan.configs import SIZE_CONFIGS, WAN_CONFIGS  # noqa: E402
from wan.modules.attention import resolve_backend  # noqa: E402
from wan.modules.fp8 import expand_parts, swap_linears_  # noqa: E402
from wan.modules.model import ForwardOptions, WanModel  # noqa: E402
from wan.utils.dtype_policy import dtype_rule  # noqa: E402
from wan.utils.timing import Timer  # noqa: E402

GiB = 2**30
TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2)


def parse_variant(spec: str) -> Tuple[Tuple[str, ...], bool]:
    """'ffn+attn_proj+attn' -> (('ffn', 'attn_proj'), True); 'bf16' -> ((), False)."""
    names = [] if spec == 'bf16' else spec.split('+')
    attn = 'attn' in names
    parts = tuple(n for n in names if n != 'attn')
    return (expand_parts(parts) if parts else ()), attn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', default='1280*720', choices=sorted(SIZE_CONFIGS))
    p.add_argument('--frames', type=int, default=81)
    p.add_argument('--layers', type=int, default=None, help='default: the task\'s 40')
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--variants', nargs='+',
                   default=['bf16', 'attn', 'ffn', 'ffn+attn_proj', 'all', 'all+attn'])
    p.add_argument('--tiny', action='store_true',
                   help='small widths on the CPU, bf16 variant only (smoke test)')
    p.add_argument('--output', default=None)
    args = p.parse_args()
    variants = [(v, *parse_variant(v)) for v in args.variants]
    done: Tuple[str, ...] = ()
    for name, parts, _ in variants:
        if not set(done) <= set(parts):
            raise SystemExit(f'variant {name}: fp8 swaps are one way; order the variants so '
                             f'that each includes the parts of the one before')
        done = parts
    if not args.tiny and not torch.cuda.is_available():
        print('bench/fp8_forward_check.py needs a CUDA GPU (or --tiny)')
        return 2
    torch._dynamo.config.cache_size_limit = 64  # one graph per variant
    if hasattr(torch._dynamo.config, 'recompile_limit'):
        torch._dynamo.config.recompile_limit = 64
    cfg = WAN_CONFIGS['t2v-A14B']
    dev = torch.device('cpu' if args.tiny else 'cuda')
    widths = TINY if args.tiny else dict(dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                                         num_heads=cfg.num_heads,
                                         num_layers=args.layers or cfg.num_layers)
    exact = resolve_backend('auto', dev)
    model = WanModel.from_random(seed=0, device=dev, dtype_rule=dtype_rule(
        WanModel, 'matmul', torch.bfloat16), **widths)
    if dev.type == 'cuda':
        for block in model.blocks:
            block.compile(dynamic=False)
    w, h = SIZE_CONFIGS[args.size] if not args.tiny else (128, 64)
    gen = torch.Generator(dev).manual_seed(0)
    lat = torch.randn(16, (args.frames - 1) // 4 + 1, h // 8, w // 8, device=dev, generator=gen)
    seq_len = lat.shape[1] * (h // 16) * (w // 16)
    ctx = [torch.randn(512, 4096, device=dev, generator=gen).bfloat16()]
    t = torch.tensor([900], device=dev)
    timer = Timer(dev)
    out: Dict[str, Any] = {
        'gpu': torch.cuda.get_device_name() if dev.type == 'cuda' else None,
        'torch': torch.__version__, 'size': args.size, 'frames': args.frames,
        'tokens': seq_len, 'widths': widths, 'exact_attention': exact,
        'weights': 'random, bf16 matmul weights (fp32 islands)',
        'git_commit': os.environ.get('GIT_COMMIT'),
        'command': ' '.join([os.path.basename(sys.executable), *sys.argv]), 'variants': {}}
    ref = None
    for name, parts, attn in variants:
        if args.tiny and (parts or attn):
            continue
        swapped = swap_linears_(model, parts) if parts else 0
        model.set_options(ForwardOptions(
            attn_backend='fa3_fp8' if attn else exact, cross_attn_backend=exact,
            per_sample_time=True, fast_rope=True))
        times: List[float] = []
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            t0 = time.perf_counter()
            y = model([lat], t, ctx, seq_len)[0]
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            if dev.type == 'cuda':
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.reps):
                with timer(times):
                    y = model([lat], t, ctx, seq_len)[0]
        row: Dict[str, Any] = {
            'fp8_parts': list(parts), 'fp8_attention': attn, 'linears_swapped_now': swapped,
            'warmup_seconds': warm, 'seconds': statistics.median(times),
            'activation_peak_gib': (torch.cuda.max_memory_allocated() - base) / GiB
            if dev.type == 'cuda' else None,
            'model_gib': sum(q.numel() * q.element_size() for q in model.parameters()) / GiB +
            sum(b.numel() * b.element_size() for b in model.buffers()) / GiB}
        if ref is None:
            ref, ref_seconds = y.float().cpu(), row['seconds']
        row['ratio_to_first'] = row['seconds'] / ref_seconds
        row['rel_err_vs_first'] = rel(y.float().cpu(), ref)
        out['variants'][name] = row
        print(json.dumps({name: row}), flush=True)
        if args.output:
            with open(args.output, 'w') as f:
                json.dump(out, f, indent=2)
    print(f"{'variant':<16}{'s/forward':>10}{'ratio':>8}{'rel err':>10}{'act GiB':>9}"
          f"{'model GiB':>10}")
    for name, r in out['variants'].items():
        print(f"{name:<16}{r['seconds']:>10.3f}{r['ratio_to_first']:>8.3f}"
              f"{r['rel_err_vs_first']:>10.4f}{r['activation_peak_gib'] or 0:>9.2f}"
              f"{r['model_gib']:>10.1f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
