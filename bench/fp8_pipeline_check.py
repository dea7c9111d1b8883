"""fp8 variants of a whole t2v-A14B generation against bf16: step time, final latent, video.

    python bench/fp8_pipeline_check.py --size 832*480 --steps 8 --output fp8_pipeline.json \
        --variants bf16 ffn all all+attn

One process, one WanT2VOptimized pipeline with random bf16 weights (compiled blocks, the
fastest exact attention), both experts resident. The variants run in the order given on the
same weights, prompt and seed: `bf16` (the exact path) first, then fp8 block linears for the
named parts of both experts (`ffn`, `attn_proj`, `cross_attn`, `all`, joined with '+'; the
swap is one way, so each variant's parts include the previous one's), with `+attn` for FA3's
fp8 self-attention (cross-attention stays on the exact kernel). The boundary is set so that
each expert runs half of the steps. Per variant: the median DiT step time per expert, its
ratio to bf16's, the peak GPU memory, and against the bf16 run the final latent's relative
error and the decoded video's PSNR. Random weights: how the trained model reacts to fp8 is
not measured here. A diagnostic: nothing here is a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.fp8_forward_check import parse_variant  # noqa: E402
from bench.instrument import StageRecorder  # noqa: E402
from bench.placement_check import even_boundary  # noqa: E402
from bench.schema import agreement, write_json_atomic  # noqa: E402
from wan.configs import SIZE_CONFIGS, WAN_CONFIGS  # noqa: E402
from wan.modules.attention import resolve_backend  # noqa: E402
from wan.modules.fp8 import swap_linears_  # noqa: E402
from wan.text2video_optimized import OptimizationConfig, WanT2VOptimized  # noqa: E402

GiB = 2**30
PROMPT = 'a red fox trots through fresh snow at dawn'


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', default='832*480', choices=sorted(SIZE_CONFIGS))
    p.add_argument('--frames', type=int, default=81)
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--variants', nargs='+', default=['bf16', 'ffn', 'all', 'all+attn'])
    p.add_argument('--output', default=None)
    args = p.parse_args()
    variants = [(v, *parse_variant(v)) for v in args.variants]
    done: Tuple[str, ...] = ()
    for name, parts, _ in variants:
        if not set(done) <= set(parts):
            raise SystemExit(f'variant {name}: fp8 swaps are one way; order the variants so '
                             f'that each includes the parts of the one before')
        done = parts
    if variants[0][1] or variants[0][2]:
        raise SystemExit('the first variant must be bf16 (the reference of the others)')
    if args.steps < 2:
        raise SystemExit('--steps must be at least 2 (one per expert)')
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    if not torch.cuda.is_available():
        print('bench/fp8_pipeline_check.py needs a CUDA GPU')
        return 2
    torch._dynamo.config.cache_size_limit = 64  # one graph per variant
    if hasattr(torch._dynamo.config, 'recompile_limit'):
        torch._dynamo.config.recompile_limit = 64
    cfg = WAN_CONFIGS['t2v-A14B']
    dev = torch.device('cuda', torch.cuda.current_device())
    size = SIZE_CONFIGS[args.size]
    t0 = time.perf_counter()
    # the exact kernel named (not 'auto'), so that the warm-up's timed kernel pick leaves the
    # variants' attention kernels as this script sets them
    pipe = WanT2VOptimized(cfg, None, random_init=True, device=dev,
                           optimizations=OptimizationConfig(
                               attention=resolve_backend('auto', dev)),
                           plan_size=(size, args.frames))
    exact = pipe.attention_backend
    out: Dict[str, Any] = {
        'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'task': 't2v-A14B',
        'size': args.size, 'frames': args.frames, 'steps': args.steps,
        'weights': 'random, bf16 matmul weights (fp32 islands)', 'exact_attention': exact,
        'build_seconds': time.perf_counter() - t0,
        'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
        'git_commit': os.environ.get('GIT_COMMIT'), 'variants': {}}
    print(json.dumps({k: v for k, v in out.items() if k != 'variants'}), flush=True)
    pipe.boundary = even_boundary(pipe, args.steps, cfg.sample_shift)
    ref = None
    for name, parts, attn in variants:
        swapped = sum(swap_linears_(m, parts) for m in pipe.experts()) if parts else 0
        for model in pipe.experts():
            model.options.attn_backend = 'fa3_fp8' if attn else exact
            model.options.cross_attn_backend = exact
        row: Dict[str, Any] = {'fp8_parts': list(parts), 'fp8_attention': attn,
                               'linears_swapped_now': swapped}
        try:
            row['warmup_seconds'] = pipe.warm_up(size, args.frames)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            rec = pipe.add_observer(StageRecorder(dev))
            t1 = time.perf_counter()
            video = pipe.generate(PROMPT, size=size, frame_num=args.frames,
                                  shift=cfg.sample_shift, sampling_steps=args.steps,
                                  guide_scale=cfg.sample_guide_scale, seed=42,
                                  offload_model=False)
            row['generate_seconds'] = time.perf_counter() - t1
            pipe.remove_observer(rec)
            row['peak_gpu_gib'] = torch.cuda.max_memory_allocated(dev) / GiB
            row['model_gib'] = sum(t.numel() * t.element_size() for m in pipe.experts()
                                   for t in [*m.parameters(), *m.buffers()]) / GiB
            steps = {e: [t for t, x in zip(rec.seconds['step'], rec.step_experts) if x == e]
                     for e in ('high', 'low')}
            row['step_seconds'] = {e: statistics.median(v) if v else None
                                   for e, v in steps.items()}
            run = {'video': video.float().cpu(), 'x0': rec.x0}
            if ref is None:
                ref, ref_row = run, row
            row['step_ratio_to_bf16'] = {
                e: row['step_seconds'][e] / ref_row['step_seconds'][e]
                for e in ('high', 'low') if row['step_seconds'][e]}
            row['vs_bf16'] = agreement(ref, run)
        except Exception as exc:  # a variant that fails is a result too
            row['error'] = f'{type(exc).__name__}: {str(exc)[:300]}'
        out['variants'][name] = row
        print(json.dumps({name: row}), flush=True)
        if args.output:
            write_json_atomic(args.output, out)
    print(f"{'variant':<12}{'step hi':>9}{'step lo':>9}{'ratio':>7}{'latent err':>11}"
          f"{'PSNR dB':>9}{'peak':>7}")
    for name, r in out['variants'].items():
        if 'error' in r:
            print(f"{name:<12} {r['error']}")
            continue
        st, ratio, a = r['step_seconds'], r['step_ratio_to_bf16'], r['vs_bf16']
        print(f"{name:<12}{st['high'] or 0:>9.2f}{st['low'] or 0:>9.2f}"
              f"{ratio.get('high', 0):>7.3f}{a['latent_rel_err'] or 0:>11.5f}"
              f"{a['psnr_db']:>9.2f}{r['peak_gpu_gib']:>7.1f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
