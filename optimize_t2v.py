"""Optimize an existing WanT2V pipeline, or report what this machine supports.

Library use (one implementation of every optimization, shared with WanT2VOptimized):

    from optimize_t2v import optimize_pipeline
    pipe = wan.WanT2V(config, checkpoint_dir=...)
    pipe = optimize_pipeline(pipe, compile=True, attention='auto')
    # a WanT2VOptimized around the same models (edited in place): use the returned object

Command line: a report of the GPU, its free memory, the importable attention kernels and
their measured speed at the requested size, and the memory plan the optimized pipeline
would choose.

    python optimize_t2v.py --size 1280*720 --frame_num 81
    python optimize_t2v.py --task t2v-tiny          # the task's defaults: 128*64, 9 frames

The task must be a text-to-video task of this project, the size one the task supports and the
frame count a positive 4n+1; anything else is refused with one `error: ...` line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from wan.text2video_optimized import OptimizationConfig, optimize_pipeline

__all__ = ['optimize_pipeline', 'OptimizationConfig', 'report']


def report(task: str = 't2v-A14B', size: Optional[str] = None,
           frame_num: Optional[int] = None, time_kernels: bool = True,
           gpu_memory_gib: Optional[float] = None,
           host_memory_gib: Optional[float] = None) -> dict:
    """What this machine supports for `task` at `size` x `frame_num` (default: the task's);
    ValueError (bench.checks.RequestError) for a task, size or frame count that cannot run.

    The memory plan is the one the optimized pipeline would make for t2v-A14B: for a GPU of
    `gpu_memory_gib` (a cap, or any GPU size: no GPU needed) and `host_memory_gib` of host
    memory (default: this machine's GPU and available host memory)."""
    import torch

    from bench.checks import check_request
    from wan.configs import SIZE_CONFIGS
    from wan.modules.attention import available_backends, resolve_backend
    from wan.utils.memory_plan import GiB, ModelSizes, plan_memory, tokens_for
    from wan.utils.placement import usable_host_bytes

    cfg, size, frame_num = check_request(task, size, frame_num)
    wh = SIZE_CONFIGS[size]
    tokens = tokens_for(wh, frame_num, cfg.vae_stride, cfg.patch_size)
    out = {'task': task, 'size': size, 'frame_num': frame_num, 'tokens': tokens,
           'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(),
           'attention_backends': available_backends(),
           'auto_attention': resolve_backend('auto'),
           'reference_attention': resolve_backend('reference')}
    gpu_bytes = None if gpu_memory_gib is None else gpu_memory_gib * GiB
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        out.update(gpu=prop.name, capability=f'{prop.major}.{prop.minor}',
                   total_gib=total / 2**30, free_gib=free / 2**30)
        gpu_bytes = free if gpu_bytes is None else min(gpu_bytes, total)
    else:
        out['note'] = 'no CUDA device: the pipeline runs on the CPU (tiny models only)'
    if gpu_bytes is not None and task == 't2v-A14B':
        host = usable_host_bytes() if host_memory_gib is None else host_memory_gib * GiB
        plan = plan_memory(gpu_bytes, host, wh, frame_num, ModelSizes.a14b(),
                           want_batched_cfg=OptimizationConfig().batched_cfg)
        out.update(memory_plan=plan.describe(), memory_plan_fits=plan.fits,
                   memory_plan_gpu_gib=gpu_bytes / GiB, memory_plan_host_gib=host / GiB,
                   memory_plan_estimates_gib=plan.estimates_gib)
    if not torch.cuda.is_available():
        return out
    if time_kernels:
        from bench.ceilings import measure_ceilings
        from wan.modules.attention import pick_kernels
        out['ceilings'] = measure_ceilings(cfg, tokens, torch.device('cuda'))
        # what 'auto' would pick at this size (batch 1: sequential CFG), as the pipeline does
        found = pick_kernels(1, tokens, cfg.num_heads, cfg.dim // cfg.num_heads, cfg.text_len,
                             torch.device('cuda'))
        if found is not None:
            out['auto_attention_picks'] = found[0]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='Report GPU, attention kernels and memory plan.')
    p.add_argument('--task', default='t2v-A14B')
    p.add_argument('--size', default=None, help="W*H (default: the task's)")
    p.add_argument('--frame_num', type=int, default=None, help="4n+1 (default: the task's)")
    p.add_argument('--no-time', dest='time_kernels', action='store_false',
                   help='skip timing the attention kernels and the GEMM rate')
    p.add_argument('--gpu_memory_gib', type=float, default=None,
                   help='plan for this much GPU memory (a cap, or another GPU\'s size)')
    p.add_argument('--host_memory_gib', type=float, default=None,
                   help='plan for this much host memory (default: what is available here)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    from bench.checks import RequestError
    try:
        if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
            raise RequestError(f'--gpu_memory_gib must be positive, got {args.gpu_memory_gib}')
        out = report(args.task, args.size, args.frame_num, args.time_kernels,
                     args.gpu_memory_gib, args.host_memory_gib)
    except RequestError as exc:
        raise SystemExit(f'error: {exc}')
    status = 0 if out.get('memory_plan_fits', True) else 1
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return status
    for key, value in out.items():
        if key == 'memory_plan_estimates_gib':
            continue
        if key == 'ceilings':
            print(f"bf16 GEMM: {value['gemm_bf16_tflops']} TFLOP/s")
            for name, v in value['attention'].items():
                print(f"attention {name}: " + (f"{v['seconds'] * 1e3:.1f} ms/layer, "
                                               f"{v['tflops']:.0f} TFLOP/s" if 'seconds' in v
                                               else v['error']))
        else:
            print(f'{key}: {value}')
    return status


if __name__ == '__main__':
    sys.exit(main())
