"""`--throughput N`: videos per hour for N prompts on W GPUs, one layout per torchrun.

    python benchmark_t2v.py --throughput 8 --nproc 8 --layouts 8 2c 1 --size 1280*720 \
        --sample_steps 4 --output throughput.json

Each layout is the size of one pipeline replica: `U` is Ulysses over U GPUs, `Uc` CFG
parallelism x Ulysses U/2 (U GPUs). The W processes split into W / U replicas (data
parallelism over prompts, wan/distributed/cfg_parallel.py), prompt i going to replica
i mod replicas, exactly as `generate_optimized.py --prompt_file` runs them. Each child builds
the optimized pipeline once, warms it up (compile), then generates its replica's prompts;
the result is the wall time from the first prompt to the last video of any replica, and
videos per hour, per layout. Nothing is written to disk but the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Dict, List

import torch

from .checks import RequestError
from .children import SCRIPT, run_child, strip_options
from .runs import environment, fmt, git_commit
from .schema import write_final, write_json_atomic

__all__ = ['THROUGHPUT_SCHEMA', 'parse_layout', 'run_throughput', 'run_throughput_child']

THROUGHPUT_SCHEMA = 'wan-fast-benchmark-throughput/1'
# options the launcher sets per child: name -> number of values
_SET_BY_LAUNCHER = {'--throughput': 1, '--nproc': 1, '--layouts': '+', '--output': 1,
                    '--ulysses_size': 1, '--cfg_parallel': 0, '--save_results': 0,
                    '--prompts': 1}


def parse_layout(spec: str, nproc: int):
    """'4' -> (ulysses 4, no CFG parallel); '4c' -> (ulysses 2, CFG parallel); the number of
    replicas of that pipeline on `nproc` GPUs."""
    cfg = spec.endswith('c')
    try:
        gpus = int(spec[:-1] if cfg else spec)
    except ValueError:
        raise RequestError(f'--layouts entries are GPUs per replica like 8, 2c or 1, got '
                           f'{spec!r}')
    if gpus < 1 or (cfg and gpus % 2) or nproc % gpus:
        raise RequestError(f'--layouts {spec}: a replica of {gpus} GPU(s) must divide the '
                           f'{nproc} processes (and be even with c)')
    return (gpus // 2 if cfg else gpus), cfg, nproc // gpus


def run_throughput(args: argparse.Namespace, argv: List[str]) -> Dict[str, Any]:
    """The launcher: one torchrun of --nproc processes per layout, in turn."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    layouts = [(spec, *parse_layout(spec, args.nproc)) for spec in args.layouts]
    base = strip_options(argv, _SET_BY_LAUNCHER)
    tmp = tempfile.mkdtemp(prefix='wan_throughput_')
    path = args.output or os.path.join(tmp, 'throughput.json')
    combined: Dict[str, Any] = {
        'schema': THROUGHPUT_SCHEMA, 'prompts': args.throughput, 'nproc': args.nproc,
        'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
        'git_commit': git_commit(),
        'date_utc': datetime.now(timezone.utc).isoformat(timespec='seconds'), 'runs': []}
    try:
        for spec, ulysses, cfg, replicas in layouts:
            out = os.path.join(tmp, f'{spec}.json')
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                   f'--nproc_per_node={args.nproc}', SCRIPT, *base, '--prompts',
                   str(args.throughput), '--ulysses_size', str(ulysses), '--output', out] + \
                (['--cfg_parallel'] if cfg else [])
            logging.info('throughput run %s: %d replica(s) of ulysses %d%s', spec, replicas,
                         ulysses, ' x CFG 2' if cfg else '')
            rc, wall = run_child(cmd)
            entry = {'layout': spec, 'ulysses_size': ulysses, 'cfg_parallel': cfg,
                     'replicas': replicas, 'returncode': rc, 'wall_seconds': wall,
                     'command': ' '.join(cmd)}
            if os.path.exists(out):
                with open(out) as f:
                    entry['result'] = json.load(f)
            combined['runs'].append(entry)
            write_json_atomic(path + '.partial', combined)
    finally:
        if args.output:
            shutil.rmtree(tmp, ignore_errors=True)
    best = max((r['result']['videos_per_hour'] for r in combined['runs'] if r.get('result')),
               default=None)
    for r in combined['runs']:
        if r.get('result') and best:
            r['relative_to_best'] = r['result']['videos_per_hour'] / best
    write_final(path, combined)
    logging.info('results written to %s', path)
    print(f"{'layout':<8}{'replicas':>9}{'videos':>8}{'wall s':>9}{'s/video':>9}"
          f"{'videos/h':>10}{'vs best':>9}")
    for r in combined['runs']:
        res = r.get('result') or {}
        print(f"{r['layout']:<8}{r['replicas']:>9}{res.get('videos', '-'):>8}"
              f"{fmt(res.get('wall_seconds'), '', 1):>9}"
              f"{fmt(res.get('seconds_per_video'), '', 1):>9}"
              f"{fmt(res.get('videos_per_hour'), '', 1):>10}"
              f"{fmt(r.get('relative_to_best'), 'x'):>9}")
    combined['output_path'] = path
    return combined


def run_throughput_child(args: argparse.Namespace) -> Dict[str, Any]:
    """One layout under torchrun: every replica generates its share of --prompts prompts."""
    import torch.distributed as dist

    from generate import init_distributed, init_logging
    from wan.configs import SIZE_CONFIGS, WAN_CONFIGS
    from wan.distributed.cfg_parallel import data_parallel_layout
    from wan.optimizations import config_from_args
    from wan.text2video_optimized import WanT2VOptimized

    rank, world, local_rank = init_distributed(args)
    init_logging(rank)
    ulysses = args.ulysses_size or 1
    replicas = data_parallel_layout(world, ulysses, args.cfg_parallel)
    cfg = WAN_CONFIGS[args.task]
    size = SIZE_CONFIGS[args.size]
    opts = config_from_args(args)
    t0 = time.perf_counter()
    pipe = WanT2VOptimized(cfg, args.ckpt_dir, device_id=local_rank, rank=rank,
                           use_sp=ulysses > 1, cfg_parallel=args.cfg_parallel,
                           ulysses_size=ulysses, data_parallel=replicas,
                           convert_model_dtype=args.convert_model_dtype,
                           random_init=args.random_init, optimizations=opts,
                           plan_size=(size, args.frame_num))
    build = time.perf_counter() - t0
    replica = pipe.parallel_info.replica if pipe.parallel_info else 0
    warm = pipe.warm_up(size, args.frame_num) if torch.cuda.is_available() else 0.0
    if dist.is_initialized():
        dist.barrier()
    started = time.perf_counter()
    mine = 0
    for i in range(args.prompts):
        if i % replicas != replica:
            continue
        pipe.generate(f'{args.prompt} (prompt {i})', size=size, frame_num=args.frame_num,
                      shift=args.sample_shift, sample_solver=args.sample_solver,
                      sampling_steps=args.sample_steps, guide_scale=args.guide_scale,
                      seed=args.seed, offload_model=False)
        mine += pipe.rank == 0
    seconds = time.perf_counter() - started
    counts = [(mine, seconds)]
    if dist.is_initialized():
        counts = [None] * world
        dist.all_gather_object(counts, (mine, seconds))
    videos, wall = sum(c for c, _ in counts), max(s for _, s in counts)
    result = {'schema': THROUGHPUT_SCHEMA, 'env': environment(pipe.device),
              'task': args.task, 'size': args.size, 'frame_num': args.frame_num,
              'sample_steps': args.sample_steps, 'world_size': world, 'replicas': replicas,
              'ulysses_size': ulysses, 'cfg_parallel': args.cfg_parallel,
              'prompts': args.prompts, 'videos': videos, 'wall_seconds': wall,
              'seconds_per_video': wall / max(videos, 1),
              'videos_per_hour': 3600 * videos / max(wall, 1e-9),
              'build_seconds': build, 'warmup_seconds': warm, 'toggles': opts.as_dict()}
    if rank == 0 and args.output:
        write_final(args.output, result)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
