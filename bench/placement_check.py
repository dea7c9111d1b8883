"""Placement on one GPU: the same generation resident and under GPU caps (block streaming).

    python bench/placement_check.py --output placement.json \
        --runs 1280*720:none 1280*720:24 1280*720:48 1280*720:40 832*480:none 832*480:16

One process, one t2v-A14B pipeline with random bf16 weights (WanT2VOptimized, compiled,
fastest attention). Each run is `SIZE:CAP` (CAP in GiB, or `none`): the cap is applied to the
caching allocator (`torch.cuda.set_per_process_memory_fraction`), the planner re-plans, the
models move where the plan says (experts streamed from page-locked host memory when they do
not fit), and one generate() with --steps steps (the boundary split evenly between the
experts) is timed stage by stage. Per run: the plan, the DiT step time per expert, T5 and VAE
decode times, the peak GPU memory, and the decoded video's agreement with the first run at
the same size (same seed and weights: streaming changes where weights live, not the math).
The host's peak RSS is read at the end. A diagnostic: nothing here is a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.instrument import StageRecorder  # noqa: E402
from bench.schema import psnr, write_json_atomic  # noqa: E402
from wan.configs import SIZE_CONFIGS, WAN_CONFIGS  # noqa: E402
from wan.text2video_optimized import OptimizationConfig, WanT2VOptimized  # noqa: E402
from wan.utils.placement import apply_gpu_cap  # noqa: E402

GiB = 2**30


def parse_run(spec: str):
    size, _, cap = spec.partition(':')
    if size not in SIZE_CONFIGS:
        raise SystemExit(f'unknown size {size!r} in --runs {spec}')
    return size, None if cap in ('', 'none') else float(cap)


def even_boundary(pipe, steps: int, shift: float) -> float:
    _, ts = pipe.make_scheduler('unipc', steps, shift, 'cpu')
    ts = ts.tolist()
    half = len(ts) // 2
    return (ts[half - 1] + ts[half]) / 2 / pipe.num_train_timesteps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', nargs='+', default=['1280*720:none', '1280*720:24',
                                                  '832*480:none', '832*480:16'])
    p.add_argument('--frames', type=int, default=81)
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--quantize', default='none',
                   help='fp8 block linears (lossy; OptimizationConfig.quantize), quantized '
                        'while the experts load: the placements then hold fp8 experts')
    p.add_argument('--output', default=None)
    args = p.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    if not torch.cuda.is_available():
        print('bench/placement_check.py needs a CUDA GPU')
        return 2
    runs = [parse_run(r) for r in args.runs]
    cfg = WAN_CONFIGS['t2v-A14B']
    dev = torch.device('cuda', torch.cuda.current_device())
    first_size = SIZE_CONFIGS[runs[0][0]]
    t0 = time.perf_counter()
    pipe = WanT2VOptimized(cfg, None, random_init=True, device=dev,
                           optimizations=OptimizationConfig(quantize=args.quantize),
                           plan_size=(first_size, args.frames))
    out = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
           'gpu_total_gib': torch.cuda.get_device_properties(dev).total_memory / GiB,
           'task': 't2v-A14B', 'frames': args.frames, 'steps': args.steps,
           'weights': 'random, bf16 matmul weights (fp32 islands)'
                      + ('' if args.quantize == 'none' else
                         f'; fp8 block linears ({args.quantize}) quantized while loading'),
           'build_seconds': time.perf_counter() - t0,
           'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
           'git_commit': os.environ.get('GIT_COMMIT'), 'runs': []}
    print(json.dumps({k: v for k, v in out.items() if k != 'runs'}), flush=True)
    pipe.boundary = even_boundary(pipe, args.steps, cfg.sample_shift)
    videos = {}
    warmed = set()
    for size_name, cap in runs:
        size = SIZE_CONFIGS[size_name]
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        pipe.gpu_memory_gib = cap
        if cap is not None:
            apply_gpu_cap(dev, cap)
        entry = {'size': size_name, 'cap_gib': cap}
        try:
            if size_name not in warmed:
                entry['warmup_seconds'] = pipe.warm_up(size, args.frames)
                warmed.add(size_name)
            # move the models for this cap before the peak is measured
            plan = pipe.place_for(size, args.frames,
                                  steps=pipe.step_split('unipc', args.steps, cfg.sample_shift))
            entry['plan'] = plan.describe()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            rec = pipe.add_observer(StageRecorder(dev))
            t1 = time.perf_counter()
            video = pipe.generate('a red fox trots through fresh snow at dawn', size=size,
                                  frame_num=args.frames, shift=cfg.sample_shift,
                                  sampling_steps=args.steps, guide_scale=cfg.sample_guide_scale,
                                  seed=42, offload_model=False)
            entry['generate_seconds'] = time.perf_counter() - t1
            pipe.remove_observer(rec)
            entry['peak_gpu_gib'] = torch.cuda.max_memory_allocated(dev) / GiB
            entry['peak_gpu_reserved_gib'] = torch.cuda.max_memory_reserved(dev) / GiB
            steps = {e: [t for t, x in zip(rec.seconds['step'], rec.step_experts) if x == e]
                     for e in ('high', 'low')}
            entry['step_seconds'] = {e: statistics.median(v) if v else None
                                     for e, v in steps.items()}
            entry['t5_seconds'] = rec.seconds['text_encode']
            entry['decode_seconds'] = rec.seconds['decode']
            entry['vae_decode_seconds'] = rec.seconds['vae_decode']
            entry['streamed'] = sorted(pipe._streaming)
            video = video.float().cpu()
            if size_name in videos:
                ref = videos[size_name]
                entry['identical_to_first_run'] = bool(torch.equal(video, ref))
                entry['psnr_vs_first_run_db'] = psnr(ref, video)
                first = next(r for r in out['runs'] if r['size'] == size_name and
                             r.get('step_seconds'))
                entry['step_ratio_to_first_run'] = {
                    e: entry['step_seconds'][e] / first['step_seconds'][e]
                    for e in ('high', 'low') if entry['step_seconds'][e]}
            else:
                videos[size_name] = video
        except Exception as exc:  # a run that does not fit is a result too
            entry['error'] = f'{type(exc).__name__}: {str(exc)[:300]}'
        print(json.dumps(entry), flush=True)
        out['runs'].append(entry)
        if args.output:
            write_json_atomic(args.output, out)
    out['peak_host_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.output:
        write_json_atomic(args.output, out)
    print(f"{'size':<10}{'cap':>6}{'step hi':>9}{'step lo':>9}{'ratio':>7}{'peak':>7}  plan")
    for r in out['runs']:
        st = r.get('step_seconds') or {}
        ratio = r.get('step_ratio_to_first_run') or {}
        print(f"{r['size']:<10}{str(r['cap_gib']):>6}{st.get('high') or 0:>9.2f}"
              f"{st.get('low') or 0:>9.2f}{ratio.get('high', 1.0):>7.3f}"
              f"{r.get('peak_gpu_gib', 0):>7.1f}  {r.get('plan', r.get('error'))}")
    print(f"peak host RSS {out['peak_host_rss_gib']:.1f} GiB")
    return 0


if __name__ == '__main__':
    sys.exit(main())
