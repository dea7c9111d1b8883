"""One A14B-sized expert on the GPU: forward time, activation peak, streaming vs resident.

    python bench/forward_check.py --sizes 832*480 1280*720 --output forward.json

Random bf16 weights ('matmul' dtype policy: bf16 matmul weights, fp32 islands), batch 1,
512 text tokens, the optimized forward options (per-sample time, fp32 RoPE, the fastest
attention kernel, compiled blocks). For each size and variant it records the median forward
time over --reps after one warm-up (compile included) and the peak GPU memory above the
model's own bytes (activations, workspaces). Variants:
- resident, FFN token chunks as configured (--ffn_chunks, default the optimized default);
- resident, FFN in one piece (ffn_chunk_tokens 0);
- streamed: the blocks in page-locked host memory, two GPU slots (wan/utils/block_streaming);
- streamed with two passes interleaved block by block (sequential CFG, one copy per block).
It also checks that the streamed output equals the resident one and that compiled blocks
did not recompile between resident and streamed runs. A diagnostic: nothing here is a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan.configs import SIZE_CONFIGS, WAN_CONFIGS  # noqa: E402
from wan.modules.attention import resolve_backend  # noqa: E402
from wan.modules.model import ForwardOptions, WanModel  # noqa: E402
from wan.utils.block_streaming import stream_blocks  # noqa: E402
from wan.utils.dtype_policy import dtype_rule  # noqa: E402
from wan.utils.timing import Timer  # noqa: E402

GiB = 2**30


def model_bytes(model: torch.nn.Module, device) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p.device.type == torch.device(device).type)


def timed_forward(model, passes, seq_len, reps, timer):
    """Warm-up (compile) then `reps` timed calls; (median seconds, peak bytes, last outputs)."""
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        out = model.forward_passes(passes, seq_len)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            with timer(times):
                out = model.forward_passes(passes, seq_len)
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak, out


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sizes', nargs='+', default=['832*480', '1280*720'])
    p.add_argument('--frames', type=int, default=81)
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--ffn_chunks', type=int, default=8192)
    p.add_argument('--layers', type=int, default=40)
    p.add_argument('--skip', nargs='*', default=[], help='variants to skip')
    p.add_argument('--output', default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print('bench/forward_check.py needs a CUDA GPU')
        return 2
    cfg = WAN_CONFIGS['t2v-A14B']
    dev = torch.device('cuda')
    timer = Timer(dev)
    kernel = resolve_backend('auto', dev)
    rule = dtype_rule(WanModel, 'matmul', torch.bfloat16)
    t0 = time.perf_counter()
    model = WanModel.from_random(seed=0, device=dev, dtype_rule=rule, dim=cfg.dim,
                                 ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                                 num_layers=args.layers)
    out = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
           'attention': kernel, 'frames': args.frames, 'layers': args.layers,
           'ffn_chunk_tokens': args.ffn_chunks, 'build_seconds': time.perf_counter() - t0,
           'model_gib': model_bytes(model, dev) / GiB,
           'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
           'git_commit': os.environ.get('GIT_COMMIT'), 'sizes': {}}
    print(json.dumps({k: v for k, v in out.items() if k != 'sizes'}), flush=True)
    for block in model.blocks:
        block.compile(dynamic=False)
    gen = torch.Generator(dev).manual_seed(0)
    import torch._dynamo.utils as dynamo_utils

    def options(chunks):
        return ForwardOptions(attn_backend=kernel, per_sample_time=True, fast_rope=True,
                              ffn_chunk_tokens=chunks)

    results = {}
    for size in args.sizes:
        w, h = SIZE_CONFIGS[size]
        lat = torch.randn(16, (args.frames - 1) // 4 + 1, h // 8, w // 8, device=dev,
                          generator=gen)
        seq_len = lat.shape[1] * lat.shape[2] * lat.shape[3] // 4
        ctx = [torch.randn(512, 4096, device=dev, dtype=torch.bfloat16, generator=gen)]
        ctx2 = [torch.randn(512, 4096, device=dev, dtype=torch.bfloat16, generator=gen)]
        t = torch.tensor([900], device=dev)
        one = [([lat], t, ctx)]
        r = results.setdefault(size, {'tokens': seq_len})
        model.set_options(options(args.ffn_chunks))
        sec, peak, ref = timed_forward(model, one, seq_len, args.reps, timer)
        r['resident'] = {'seconds': sec, 'activation_peak_gib': peak / GiB}
        print(size, 'resident', r['resident'], flush=True)
        if 'unchunked' not in args.skip:
            model.set_options(options(0))
            sec, peak, o = timed_forward(model, one, seq_len, args.reps, timer)
            r['resident_ffn_unchunked'] = {'seconds': sec, 'activation_peak_gib': peak / GiB,
                                           'rel_err_vs_chunked': rel(o[0][0], ref[0][0])}
            print(size, 'unchunked', r['resident_ffn_unchunked'], flush=True)
            model.set_options(options(args.ffn_chunks))
        results[size]['_ref'] = ref
        results[size]['_inputs'] = (one, [([lat], t, ctx), ([lat], t, ctx2)], seq_len)
    frames_before = dict(dynamo_utils.counters['stats'])
    if 'streamed' not in args.skip:
        runner = stream_blocks(model, dev)
        out['stream_bytes_per_block'] = runner.bytes_per_block
        out['stream_host_pinned'] = runner._arena.pinned
        out['model_gib_on_gpu_streamed'] = model_bytes(model, dev) / GiB
        for size in args.sizes:
            r = results[size]
            one, two, seq_len = r.pop('_inputs')
            ref = r.pop('_ref')
            sec, peak, o = timed_forward(model, one, seq_len, args.reps, timer)
            r['streamed'] = {'seconds': sec, 'gpu_peak_above_resident_weights_gib': peak / GiB,
                             'equal_to_resident': bool(torch.equal(o[0][0], ref[0][0])),
                             'ratio_to_resident': sec / r['resident']['seconds']}
            print(size, 'streamed', r['streamed'], flush=True)
            sec, peak, o = timed_forward(model, two, seq_len, args.reps, timer)
            r['streamed_two_passes'] = {'seconds': sec, 'peak_gib': peak / GiB,
                                        'per_pass_ratio_to_resident':
                                            sec / 2 / r['resident']['seconds'],
                                        'first_pass_equal': bool(torch.equal(o[0][0],
                                                                             ref[0][0]))}
            print(size, 'streamed x2', r['streamed_two_passes'], flush=True)
    out['dynamo_stats_before_streaming'] = frames_before
    out['dynamo_stats_after'] = dict(dynamo_utils.counters['stats'])
    for r in results.values():
        r.pop('_ref', None)
        r.pop('_inputs', None)
    out['sizes'] = results
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(out, f, indent=2, default=str)
    print(f"{'size':<10}{'variant':<26}{'s/forward':>10}{'act GiB':>9}")
    for size, r in results.items():
        for k, v in r.items():
            if isinstance(v, dict):
                print(f"{size:<10}{k:<26}{v['seconds']:>10.3f}"
                      f"{v.get('activation_peak_gib', v.get('peak_gib', v.get('gpu_peak_above_resident_weights_gib', 0))):>9.2f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
