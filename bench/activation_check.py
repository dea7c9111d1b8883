"""What is live at the activation peak of one optimized expert forward (a diagnostic).

    python bench/activation_check.py --size 1280*720 --layers 2 --output activation.json

A model of A14B widths with --layers blocks (the peak of a forward is one block's peak plus
what lives across blocks, so two blocks show it), random bf16 weights ('matmul' dtype policy),
the optimized forward options (per-sample time, fp32 RoPE, the fastest attention kernel),
batch 1, 512 text tokens; compiled blocks and eager blocks. For each, the CUDA caching
allocator's history is recorded over one forward after a warm-up, and at the moment the
allocated bytes peak the script lists the live allocations made during the forward, largest
first, with their size in GiB, how many tensors of the (B, L, dim) bf16 size that is, and the
innermost frames of this project's code that allocated them. Nothing here is a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan.configs import SIZE_CONFIGS, WAN_CONFIGS  # noqa: E402
from wan.modules.attention import resolve_backend  # noqa: E402
from wan.modules.model import ForwardOptions, WanModel  # noqa: E402
from wan.utils.dtype_policy import dtype_rule  # noqa: E402

GiB = 2**30


def _frames(entry: Dict[str, Any], depth: int = 4) -> List[str]:
    """The innermost frames of a history entry that lie in this project (or inductor's
    generated code, which names its buffers)."""
    out = []
    for f in entry.get('frames', []):
        name = f.get('filename', '')
        if ('/wan/' in name or '/bench/' in name or 'torchinductor' in name or
                name.endswith('.py') and '/tmp/' in name):
            out.append(f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}")
        if len(out) >= depth:
            break
    return out


def live_at_peak(snapshot: Dict[str, Any], unit: int) -> Dict[str, Any]:
    """Replay the allocator trace: the peak allocated bytes (relative to the trace's start)
    and the allocations live at that moment, largest first."""
    events = [e for dev in snapshot.get('device_traces', []) for e in dev]
    live: Dict[int, Dict[str, Any]] = {}
    now = peak = 0
    peak_live: List[Dict[str, Any]] = []
    for e in events:
        action, addr, size = e.get('action'), e.get('addr'), e.get('size', 0)
        if action == 'alloc':
            live[addr] = e
            now += size
            if now > peak:
                peak = now
                peak_live = list(live.values())
        elif action in ('free_requested', 'free_completed'):
            if action == 'free_requested' and addr in live:
                now -= live.pop(addr).get('size', 0)
    rows = sorted(peak_live, key=lambda e: -e.get('size', 0))
    return {'peak_gib_above_trace_start': peak / GiB,
            'live_at_peak': [{'gib': e.get('size', 0) / GiB,
                              'bf16_token_tensors': e.get('size', 0) / unit,
                              'frames': _frames(e)} for e in rows[:24]],
            'live_count': len(rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', default='1280*720', choices=sorted(SIZE_CONFIGS))
    p.add_argument('--frames', type=int, default=81)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--variants', nargs='+', default=['compiled', 'eager'],
                   choices=['compiled', 'eager'])
    p.add_argument('--output', default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print('bench/activation_check.py needs a CUDA GPU')
        return 2
    cfg = WAN_CONFIGS['t2v-A14B']
    dev = torch.device('cuda')
    kernel = resolve_backend('auto', dev)
    model = WanModel.from_random(seed=0, device=dev, dtype_rule=dtype_rule(
        WanModel, 'matmul', torch.bfloat16), dim=cfg.dim, ffn_dim=cfg.ffn_dim,
        num_heads=cfg.num_heads, num_layers=args.layers)
    model.set_options(ForwardOptions(attn_backend=kernel, per_sample_time=True,
                                     fast_rope=True))
    w, h = SIZE_CONFIGS[args.size]
    gen = torch.Generator(dev).manual_seed(0)
    lat = torch.randn(16, (args.frames - 1) // 4 + 1, h // 8, w // 8, device=dev, generator=gen)
    seq_len = lat.shape[1] * (h // 16) * (w // 16)
    ctx = [torch.randn(512, 4096, device=dev, generator=gen).bfloat16()]
    t = torch.tensor([900], device=dev)
    unit = seq_len * cfg.dim * 2
    out: Dict[str, Any] = {
        'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'size': args.size,
        'frames': args.frames, 'tokens': seq_len, 'layers': args.layers, 'attention': kernel,
        'bf16_token_tensor_gib': unit / GiB, 'git_commit': os.environ.get('GIT_COMMIT'),
        'command': ' '.join([os.path.basename(sys.executable), *sys.argv]), 'variants': {}}

    def forward():
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            return model([lat], t, ctx, seq_len)

    for variant in args.variants:
        if variant == 'compiled':
            for block in model.blocks:
                block.compile(dynamic=False)
        else:
            for block in model.blocks:
                block._compiled_call_impl = None  # nn.Module.compile's slot: eager again
        t0 = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks='python')
        try:
            forward()
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        row = {'warmup_seconds': warm,
               'activation_peak_gib': (torch.cuda.max_memory_allocated() - base) / GiB}
        row.update(live_at_peak(snap, unit))
        out['variants'][variant] = row
        print(f"{args.size} {variant}: activation peak {row['activation_peak_gib']:.2f} GiB "
              f"({row['activation_peak_gib'] * GiB / unit:.1f} bf16 token tensors)", flush=True)
        for r in row['live_at_peak'][:12]:
            print(f"  {r['gib']:6.2f} GiB ({r['bf16_token_tensors']:4.1f}x)  "
                  f"{' <- '.join(r['frames'][:3])}", flush=True)
        if args.output:
            with open(args.output, 'w') as f:
                json.dump(out, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
