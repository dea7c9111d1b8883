"""The flags of `benchmark_t2v.py` and its `main` (usage in that file's docstring)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import List, Optional

from wan.optimizations import OptimizationConfig, toggle_names
from wan.configs.presets import PRESETS
from wan.text2video import SOLVERS

from .checks import RequestError, check_device_holds, check_request
from .children import EXIT_OUT_OF_MEMORY

__all__ = ['parse_args', 'complete_args', 'main']

DESCRIPTION = ('Benchmark the reference path (WanT2V) against the optimized one '
               '(WanT2VOptimized).')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    # no abbreviations: the launchers rewrite command lines by full option names
    p = argparse.ArgumentParser(prog='benchmark_t2v.py', description=DESCRIPTION,
                                allow_abbrev=False)
    p.add_argument('--mode', choices=['baseline', 'optimized', 'both'], default='both')
    p.add_argument('--task', default='t2v-A14B')
    p.add_argument('--size', default=None, help="W*H (default: the task's, 1280*720; "
                                                "t2v-tiny: 128*64)")
    p.add_argument('--frame_num', type=int, default=None, help="4n+1 (default: the task's)")
    p.add_argument('--sample_steps', type=int, default=4)
    p.add_argument('--sample_shift', type=float, default=None)
    p.add_argument('--sample_solver', default='unipc', choices=list(SOLVERS))
    p.add_argument('--boundary', default='auto',
                   help="'auto' splits the steps evenly between the experts; 'config' keeps "
                        "the config's boundary; or a number in (0, 1)")
    p.add_argument('--warmup', type=int, default=0, help='steps per expert excluded from '
                                                         'the medians')
    p.add_argument('--num_runs', type=int, default=1)
    p.add_argument('--ckpt_dir', default=None, help='real weights (default: --random_init)')
    p.add_argument('--random_init', action='store_true', default=False)
    p.add_argument('--prompt', default='A red fox trots through fresh snow at dawn, cinematic.')
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--convert_model_dtype', dest='convert_model_dtype', action='store_true',
                   default=True, help='bf16 experts in both modes (default; the reference '
                                      'README setting for 80 GB GPUs)')
    p.add_argument('--no-convert_model_dtype', dest='convert_model_dtype', action='store_false')
    p.add_argument('--baseline_attention', default='reference',
                   help="the reference path's kernel ('reference': what upstream would use)")
    p.add_argument('--same_kernel_baseline', action='store_true', default=False,
                   help='also time the reference path with the optimized kernel')
    # optimized mode: OptimizationConfig's valued fields (--attention, --compile_mode,
    # --ffn_chunk_tokens, --quantize, --fp8_*_bf16_steps), as generate_optimized.py spells them
    defaults = OptimizationConfig()
    for f in fields(OptimizationConfig):
        if f.type in ('bool', bool):
            continue
        value = getattr(defaults, f.name)
        p.add_argument(f'--{f.name}', type=type(value), default=value,
                       choices=list(f.metadata['choices']) or None,
                       help='optimized mode: ' + f.metadata['help'])
    p.add_argument('--preset', default=None, choices=sorted(PRESETS),
                   help='a sampling recipe (lightning: Euler, 4 steps, shift 5, guidance 1.0, '
                        'boundary 0.875) for the options left at their defaults')
    p.add_argument('--lora_rank', type=int, default=0,
                   help='merge a random LoRA of this rank into both experts (e.g. 64, the '
                        'Lightning LoRAs\' rank): its cost is the merge at build time')
    p.add_argument('--gpu_memory_gib', type=float, default=None,
                   help='optimized mode: cap the GPU memory the pipeline may use (the planner '
                        'streams expert blocks when they do not fit)')
    for t in toggle_names():
        p.add_argument(f'--no-{t}', dest=t, action='store_false', default=getattr(defaults, t))
        p.add_argument(f'--{t}', dest=t, action='store_true',
                       help=f'optimization toggle (default {getattr(defaults, t)})')
    p.add_argument('--ablate', nargs='*', default=None, metavar='TOGGLE',
                   help='flip each listed toggle in turn (default: every toggle that is on), '
                        'each configuration in a fresh process; see bench/ablation.py')
    p.add_argument('--ablate_steps', type=int, default=None,
                   help='denoising steps of each ablation run (default: --sample_steps)')
    p.add_argument('--profile', action='store_true', help='torch.profiler breakdown of one '
                                                          'forward per mode')
    # multi-GPU (under torchrun), as generate.py
    p.add_argument('--ulysses_size', type=int, default=None,
                   help='Ulysses degree (default under torchrun: every rank, halved with '
                        '--cfg_parallel)')
    p.add_argument('--cfg_parallel', action='store_true', default=False)
    p.add_argument('--dit_fsdp', action='store_true', default=False)
    p.add_argument('--t5_fsdp', action='store_true', default=False)
    p.add_argument('--peer', default=None, choices=['diffusers'],
                   help="time diffusers' WanTransformer3DModel beside this project's forward "
                        '(same GPU, same process, same shapes; bench/peer.py; needs diffusers)')
    p.add_argument('--peer_pipeline', action='store_true', default=False,
                   help="with --peer diffusers: also WanT2VOptimized.generate against "
                        "diffusers' WanPipeline end to end, --sample_steps steps")
    p.add_argument('--throughput', type=int, default=None, metavar='PROMPTS',
                   help='videos per hour for this many prompts on --nproc GPUs, one torchrun '
                        'per --layouts entry (bench/throughput.py)')
    p.add_argument('--nproc', type=int, default=None,
                   help='with --throughput: processes (GPUs) per run')
    p.add_argument('--layouts', nargs='+', default=None, metavar='U',
                   help="with --throughput: GPUs per pipeline replica, e.g. 8 2c 1 ('Uc': CFG "
                        "parallel x Ulysses U/2)")
    p.add_argument('--prompts', type=int, default=None, help=argparse.SUPPRESS)  # child
    p.add_argument('--scaling', nargs='+', default=None, metavar='N',
                   help="launch one torchrun per entry (N GPUs, Ulysses over all; 'Nc': CFG "
                        "parallel x Ulysses N/2) and compare per-step times with N=1")
    p.add_argument('--output', default=None, help='JSON path')
    p.add_argument('--save_results', action='store_true',
                   help='write JSON under bench/results/ (default name from GPU and size)')
    return p.parse_args(argv)


def complete_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the task's defaults and refuse what cannot run here, before anything is built."""
    import torch
    cfg, args.size, args.frame_num = check_request(args.task, args.size, args.frame_num)
    args.guide_scale = cfg.sample_guide_scale
    if args.preset is not None:
        recipe = PRESETS[args.preset]
        defaults = {'sample_solver': 'unipc', 'sample_steps': 4, 'boundary': 'auto'}
        for key in ('sample_solver', 'sample_steps'):
            if getattr(args, key) == defaults[key]:
                setattr(args, key, recipe[key])
        args.sample_shift = args.sample_shift or recipe['sample_shift']
        args.guide_scale = recipe['sample_guide_scale']
        if args.boundary == defaults['boundary']:
            args.boundary = str(recipe['boundary'])
    args.sample_shift = args.sample_shift or cfg.sample_shift
    if args.lora_rank < 0:
        raise RequestError(f'--lora_rank must be >= 0, got {args.lora_rank}')
    if args.sample_steps < 1:
        raise RequestError(f'--sample_steps must be >= 1, got {args.sample_steps}')
    if args.ablate_steps is not None and args.ablate_steps < 1:
        raise RequestError(f'--ablate_steps must be >= 1, got {args.ablate_steps}')
    if args.boundary not in ('auto', 'config'):
        try:
            ok = 0 < float(args.boundary) < 1
        except ValueError:
            ok = False
        if not ok:
            raise RequestError(f"--boundary must be 'auto', 'config' or a number in (0, 1), "
                               f"got {args.boundary!r}")
    if args.scaling and args.ablate is not None:
        raise RequestError('--scaling and --ablate are separate runs: give one of them')
    if args.throughput is not None:
        if args.throughput < 1 or not args.nproc or args.nproc < 1 or not args.layouts:
            raise RequestError('--throughput N needs N >= 1 prompts, --nproc P >= 1 and '
                               '--layouts (e.g. --nproc 8 --layouts 8 2c 1)')
        if args.scaling or args.ablate is not None:
            raise RequestError('--throughput is a run of its own: no --scaling or --ablate')
        from .throughput import parse_layout
        for spec in args.layouts:
            parse_layout(spec, args.nproc)
    if args.ckpt_dir is None:
        args.random_init = True
    check_device_holds(args.task, cfg, torch.device('cuda' if torch.cuda.is_available()
                                                    else 'cpu'))
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark the command line asks for; its result (also written as asked)."""
    import torch
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        complete_args(args)
        if args.scaling:
            from .scaling import run_scaling
            return run_scaling(args, argv)
        if args.peer is not None:
            from .peer import diffusers_available
            from .peer import main as peer_main
            if not diffusers_available():
                raise RequestError('--peer diffusers needs the diffusers package (pip install '
                                   'diffusers); it is never a dependency of this project')
            if not torch.cuda.is_available():
                raise RequestError('--peer diffusers compares forwards on a CUDA GPU')
            peer_main(['--sizes', args.size, '--frames', str(args.frame_num)] +
                      (['--pipeline', '--steps', str(args.sample_steps)]
                       if args.peer_pipeline else []) +
                      (['--output', args.output] if args.output else []))
            return {'peer': args.peer, 'output_path': args.output}
        if args.throughput is not None:
            from .throughput import run_throughput
            return run_throughput(args, argv)
        if args.prompts is not None:  # one --throughput layout, under torchrun
            from .throughput import run_throughput_child
            return run_throughput_child(args)
        if args.ablate is not None:
            from .ablation import run_ablation
            return run_ablation(args, argv)
        from .runs import run_benchmark
        return run_benchmark(args)
    except RequestError as exc:
        raise SystemExit(f'error: {exc}')
    except torch.cuda.OutOfMemoryError as exc:
        print(f'error: out of GPU memory: {str(exc).splitlines()[0]}', file=sys.stderr)
        raise SystemExit(EXIT_OUT_OF_MEMORY)
