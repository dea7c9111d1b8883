"""`--peer diffusers`: this project's DiT forward beside diffusers' `WanTransformer3DModel`.

    python benchmark_t2v.py --peer diffusers --sizes 832*480 1280*720 --output peer.json

Only when the `diffusers` package is importable (it is never a dependency of this project).
Both transformers are built with the task's A14B widths and random bf16 weights on one GPU,
in one process, and run one forward (one CFG branch, batch 1, 512 text tokens) at the same
shapes, after a warm-up:
- this project: WanT2VOptimized's forward options (per-sample time, fp32 RoPE, the self- and
  cross-attention kernels timed fastest at each size, as its warm-up picks them) and compiled
  blocks, in the reference's numerics (fp32 residual stream);
- diffusers, eager, with each attention backend it can use here (native SDPA, cuDNN, FA3),
  and with `compile_repeated_blocks(fullgraph=True)` on its fastest eager backend.
Per size and variant: the median seconds per forward and the peak GPU memory above the
weights. diffusers' FA3 backend looks for the `flash_attn_interface` module; where only the
`fa3-fwd` wheel provides FA3 (`fa3_fwd_interface`, the same functions), that module is
registered under the expected name for the run, and the JSON says so. `--tiny` runs small
widths on the CPU (a smoke test of this script, no measurement).

`--pipeline` adds the second stage, one generation end to end per size with `--steps` steps:
`WanT2VOptimized.generate` (random weights, T5 included) against diffusers' `WanPipeline`
built from two `WanTransformer3DModel` experts (compiled as above, its fastest attention), its
UniPC flow scheduler (the task's shift), a random-weight `AutoencoderKLWan` and prompt
embeddings passed in (no text encoder: its T5 is not timed). Each side warms up with two steps
first (compilation), runs alone on the GPU (the other side freed), and reports its per-step
median, VAE decode, total and peak; the 40-step totals are projected from those stages,
and ours is compared with and without its T5 time (`ours_projected_speedup[_without_t5]`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.schema import write_json_atomic  # noqa: E402
from wan.utils.timing import Timer  # noqa: E402

__all__ = ['diffusers_available', 'peer_forwards', 'peer_pipelines', 'main']

GiB = 2**30
TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2)
PROMPT = 'a red fox trots through fresh snow at dawn'


def diffusers_available() -> bool:
    return importlib.util.find_spec('diffusers') is not None


def _fa3_alias() -> Optional[str]:
    """Make the fa3-fwd wheel visible to diffusers under the module name it imports."""
    if importlib.util.find_spec('flash_attn_interface') is not None:
        return None
    try:
        mod = importlib.import_module('fa3_fwd_interface')
    except Exception:  # noqa: BLE001 - no FA3 here
        return None
    sys.modules['flash_attn_interface'] = mod
    return 'fa3_fwd_interface registered as flash_attn_interface for diffusers'


def _enable_diffusers_fa3() -> bool:
    from diffusers.models import attention_dispatch as ad
    mod = sys.modules.get('flash_attn_interface')
    if mod is None or not torch.cuda.is_available():
        return False
    ad._CAN_USE_FLASH_ATTN_3 = True
    ad.flash_attn_3_func = mod.flash_attn_func
    if hasattr(mod, 'flash_attn_varlen_func'):
        ad.flash_attn_3_varlen_func = mod.flash_attn_varlen_func
    return True


def _time(fn: Callable[[], Any], reps: int, timer: Timer, device) -> Dict[str, float]:
    """Warm-up call (compile included), then `reps` timed calls: median seconds, peak."""
    with torch.no_grad():
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times: List[float] = []
        for _ in range(reps):
            with timer(times):
                fn()
        peak = (torch.cuda.max_memory_allocated() - base) / GiB if device.type == 'cuda' \
            else None
    return {'seconds': statistics.median(times), 'activation_peak_gib': peak}


def peer_forwards(sizes: List[str], frames: int, reps: int, tiny: bool = False,
                  backends: Optional[List[str]] = None,
                  after_size: Optional[Callable[[Dict[str, Any]], None]] = None
                  ) -> Dict[str, Any]:
    from wan.configs import SIZE_CONFIGS, WAN_CONFIGS
    from wan.modules.attention import pick_kernels, resolve_backend
    from wan.modules.model import ForwardOptions, WanModel
    from wan.optimizations import compile_blocks
    from wan.utils.dtype_policy import dtype_rule
    alias = _fa3_alias()
    import diffusers
    from diffusers import WanTransformer3DModel

    cfg = WAN_CONFIGS['t2v-A14B']
    widths = TINY if tiny else dict(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                                    num_layers=cfg.num_layers)
    dev = torch.device('cpu' if tiny else 'cuda')
    timer = Timer(dev)
    gen = torch.Generator(dev).manual_seed(0)
    ours = WanModel.from_random(seed=0, device=dev, dtype_rule=dtype_rule(
        WanModel, 'matmul', torch.bfloat16), **widths)
    kernel = resolve_backend('auto', dev)
    ours.set_options(ForwardOptions(attn_backend=kernel, per_sample_time=True,
                                    fast_rope=True))
    if dev.type == 'cuda':
        compile_blocks(ours)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # diffusers' modules built straight in bf16
    try:
        with torch.device(dev):
            theirs = WanTransformer3DModel(
                num_attention_heads=widths['num_heads'],
                attention_head_dim=widths['dim'] // widths['num_heads'],
                ffn_dim=widths['ffn_dim'], num_layers=widths['num_layers'],
                text_dim=4096, freq_dim=256).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(saved)
    fa3 = _enable_diffusers_fa3()
    backends = backends or (['native', '_native_cudnn'] + (['_flash_3'] if fa3 else [])
                            if dev.type == 'cuda' else ['native'])
    out: Dict[str, Any] = {
        'diffusers': diffusers.__version__, 'torch': torch.__version__,
        'gpu': torch.cuda.get_device_name() if dev.type == 'cuda' else None,
        'widths': widths, 'frames': frames, 'reps': reps, 'ours_attention': kernel,
        'ours_compiled': dev.type == 'cuda', 'fa3_alias': alias, 'sizes': {}}
    for size in sizes:
        w, h = SIZE_CONFIGS[size]
        t_lat = (frames - 1) // 4 + 1
        lat = torch.randn(16, t_lat, h // 8, w // 8, device=dev, generator=gen)
        seq_len = t_lat * (h // 16) * (w // 16)
        ctx = torch.randn(512, 4096, device=dev, generator=gen).bfloat16()
        t = torch.tensor([900], device=dev)
        row: Dict[str, Any] = {'tokens': seq_len}
        # as WanT2VOptimized with attention='auto': the kernels timed fastest at this shape
        found = pick_kernels(1, seq_len, widths['num_heads'],
                             widths['dim'] // widths['num_heads'], 512, dev)
        if found is not None:
            ours.options.attn_backend = found[0]['self']
            ours.options.cross_attn_backend = found[0]['cross']
        row['ours_kernels'] = {'self': ours.options.attn_backend,
                               'cross': ours.options.cross_attn_backend or
                               ours.options.attn_backend,
                               'ms_per_call': found[1] if found else None}

        def run_ours():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return ours([lat], t, [ctx], seq_len)

        row['ours'] = _time(run_ours, reps, timer, dev)
        logging.info('%s ours: %s', size, row['ours'])
        hidden, text = lat[None].bfloat16(), ctx[None]

        def run_theirs():
            return theirs(hidden_states=hidden, timestep=t, encoder_hidden_states=text,
                          return_dict=False)

        eager = {}
        for backend in backends:
            try:
                theirs.set_attention_backend(backend)
                eager[backend] = _time(run_theirs, reps, timer, dev)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run here
                eager[backend] = {'error': f'{type(exc).__name__}: {str(exc)[:200]}'}
            logging.info('%s diffusers eager %s: %s', size, backend, eager[backend])
        row['diffusers_eager'] = eager
        ok = {b: r['seconds'] for b, r in eager.items() if 'seconds' in r}
        if ok and dev.type == 'cuda':
            best = min(ok, key=ok.get)
            theirs.set_attention_backend(best)
            if not getattr(theirs, '_wan_compiled', False):
                theirs.compile_repeated_blocks(fullgraph=True)
                theirs._wan_compiled = True
            row['diffusers_compiled'] = dict(_time(run_theirs, reps, timer, dev),
                                             attention=best)
            logging.info('%s diffusers compiled: %s', size, row['diffusers_compiled'])
            row['ours_speedup_vs_diffusers_compiled'] = \
                row['diffusers_compiled']['seconds'] / row['ours']['seconds']
        out['sizes'][size] = row
        if after_size is not None:  # what is measured so far survives a later failure
            after_size(out)
    return out


def _synced(dev: torch.device) -> float:
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _ours_pipeline(size: str, frames: int, steps: int, tiny: bool, dev: torch.device
                   ) -> Dict[str, Any]:
    """WanT2VOptimized.generate end to end: T5, steps, decode (stage times observed)."""
    from bench.instrument import StageRecorder
    from wan.configs import SIZE_CONFIGS, WAN_CONFIGS
    from wan.text2video_optimized import OptimizationConfig, WanT2VOptimized
    cfg = WAN_CONFIGS['t2v-tiny' if tiny else 't2v-A14B']
    wh = SIZE_CONFIGS[size]
    pipe = WanT2VOptimized(cfg, None, random_init=True, device=dev,
                           optimizations=OptimizationConfig(), plan_size=(wh, frames))
    kw = dict(size=wh, frame_num=frames, shift=cfg.sample_shift,
              guide_scale=cfg.sample_guide_scale, seed=42, offload_model=False)
    t0 = _synced(dev)
    pipe.generate(PROMPT, sampling_steps=2, **kw)  # compile and autotuning
    warm = _synced(dev) - t0
    rec = pipe.add_observer(StageRecorder(dev))
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = _synced(dev)
    pipe.generate(PROMPT + ' ', sampling_steps=steps, **kw)  # a new prompt: T5 runs
    total = _synced(dev) - t0
    out = {'warmup_seconds': warm, 'total_seconds': total,
           'step_seconds': statistics.median(rec.seconds['step']),
           't5_seconds': sum(rec.seconds['text_encode']),
           'decode_seconds': sum(rec.seconds['decode']),
           'peak_gpu_gib': torch.cuda.max_memory_allocated(dev) / GiB
           if dev.type == 'cuda' else None}
    del pipe
    return out


def _diffusers_pipeline(size: str, frames: int, steps: int, tiny: bool, dev: torch.device,
                        backend: Optional[str]) -> Dict[str, Any]:
    """diffusers' WanPipeline end to end from prompt embeddings: steps, then the VAE decode
    (run by this function on the latents the pipeline returns, as the pipeline would)."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from wan.configs import SIZE_CONFIGS, WAN_CONFIGS
    cfg = WAN_CONFIGS['t2v-A14B']
    widths = TINY if tiny else dict(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                                    num_layers=cfg.num_layers)
    w, h = SIZE_CONFIGS[size]
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            experts = [WanTransformer3DModel(
                num_attention_heads=widths['num_heads'],
                attention_head_dim=widths['dim'] // widths['num_heads'],
                ffn_dim=widths['ffn_dim'], num_layers=widths['num_layers'], text_dim=4096,
                freq_dim=256).eval().requires_grad_(False) for _ in range(2)]
    finally:
        torch.set_default_dtype(saved)
    with torch.device(dev):
        vae = AutoencoderKLWan(**({'base_dim': 16} if tiny else {})).eval().requires_grad_(False)
    scheduler = UniPCMultistepScheduler(prediction_type='flow_prediction', use_flow_sigmas=True,
                                        num_train_timesteps=cfg.num_train_timesteps,
                                        flow_shift=cfg.sample_shift)
    for expert in experts:
        if backend is not None:
            expert.set_attention_backend(backend)
        if dev.type == 'cuda':
            expert.compile_repeated_blocks(fullgraph=True)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                       transformer=experts[0], transformer_2=experts[1],
                       boundary_ratio=cfg.boundary)
    gen = torch.Generator(dev).manual_seed(0)
    embeds = torch.randn(1, 512, 4096, device=dev, generator=gen).bfloat16()
    null = torch.randn(1, 512, 4096, device=dev, generator=gen).bfloat16()
    high, low = cfg.sample_guide_scale[1], cfg.sample_guide_scale[0]
    marks: List[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        marks.append(_synced(dev))
        return kwargs

    def run(n: int):
        marks.clear()
        marks.append(_synced(dev))
        latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=null, height=h, width=w,
                       num_frames=frames, num_inference_steps=n, guidance_scale=high,
                       guidance_scale_2=low, output_type='latent', return_dict=False,
                       callback_on_step_end=on_step)[0]
        t0 = _synced(dev)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        with torch.no_grad():
            vae.decode((latents.to(vae.dtype) * std.to(vae.dtype) + mean.to(vae.dtype)),
                       return_dict=False)
        return _synced(dev) - t0

    t0 = _synced(dev)
    run(2)  # compile and autotuning
    warm = _synced(dev) - t0
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = _synced(dev)
    decode = run(steps)
    total = _synced(dev) - t0
    out = {'warmup_seconds': warm, 'total_seconds': total,
           'step_seconds': statistics.median(b - a for a, b in zip(marks, marks[1:])),
           't5_seconds': None, 'decode_seconds': decode,
           'peak_gpu_gib': torch.cuda.max_memory_allocated(dev) / GiB
           if dev.type == 'cuda' else None, 'attention': backend or 'default'}
    del pipe, experts, vae
    return out


def peer_pipelines(sizes: List[str], frames: int, steps: int, tiny: bool = False,
                   backend: Optional[str] = None) -> Dict[str, Any]:
    """The end-to-end stage: per size, ours then diffusers', each alone on the device."""
    import gc
    dev = torch.device('cpu' if tiny else 'cuda')
    if backend is None and dev.type == 'cuda':
        backend = '_flash_3' if _enable_diffusers_fa3() else '_native_cudnn'
    rows: Dict[str, Any] = {}
    for size in sizes:
        row: Dict[str, Any] = {}
        for name, fn in (('ours', lambda: _ours_pipeline(size, frames, steps, tiny, dev)),
                         ('diffusers', lambda: _diffusers_pipeline(size, frames, steps, tiny,
                                                                   dev, backend))):
            try:
                row[name] = fn()
            except Exception as exc:  # noqa: BLE001 - a side that fails is a result too
                row[name] = {'error': f'{type(exc).__name__}: {str(exc)[:300]}'}
            gc.collect()
            if dev.type == 'cuda':
                torch.cuda.empty_cache()
            logging.info('%s %s pipeline: %s', size, name, row[name])
            r = row[name]
            if 'error' not in r:  # 40 steps from the measured stages
                r['projected_40_step_seconds'] = (r['t5_seconds'] or 0.0) + \
                    40 * r['step_seconds'] + r['decode_seconds']
        if 'error' not in row['ours'] and 'error' not in row['diffusers']:
            row['ours_step_speedup'] = row['diffusers']['step_seconds'] / \
                row['ours']['step_seconds']
            row['ours_projected_speedup'] = row['diffusers']['projected_40_step_seconds'] / \
                row['ours']['projected_40_step_seconds']
            # like for like: diffusers' side has no text encoder, so ours without its T5
            row['ours_projected_speedup_without_t5'] = \
                row['diffusers']['projected_40_step_seconds'] / \
                (row['ours']['projected_40_step_seconds'] - row['ours']['t5_seconds'])
        rows[size] = row
    return {'steps': steps, 'sizes': rows}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sizes', nargs='+', default=['832*480', '1280*720'])
    p.add_argument('--frames', type=int, default=81)
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--tiny', action='store_true', help='small widths on the CPU (smoke test)')
    p.add_argument('--backends', nargs='+', default=None,
                   help="diffusers' eager attention backends to time (default: native, "
                        "_native_cudnn and _flash_3 where FA3 is importable)")
    p.add_argument('--pipeline', action='store_true',
                   help="also the end-to-end stage: WanT2VOptimized.generate against "
                        "diffusers' WanPipeline, --steps steps per size")
    p.add_argument('--steps', type=int, default=40, help='denoising steps of --pipeline')
    p.add_argument('--no-forwards', dest='forwards', action='store_false',
                   help='skip the per-forward stage (with --pipeline)')
    p.add_argument('--output', default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format='[%(asctime)s] %(levelname)s: %(message)s')
    if not diffusers_available():
        print('error: --peer diffusers needs the diffusers package (pip install diffusers)',
              file=sys.stderr)
        return 1
    if not args.tiny and not torch.cuda.is_available():
        print('error: the peer comparison needs a CUDA GPU (or --tiny for a CPU smoke test)',
              file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    meta = dict(git_commit=os.environ.get('GIT_COMMIT'),
                command=' '.join([os.path.basename(sys.executable), *sys.argv]))

    def write(out: Dict[str, Any]) -> None:
        if args.output:  # whole or not at all: a run cut short keeps the previous write
            write_json_atomic(args.output, dict(out, **meta, seconds=time.perf_counter() - t0))

    if not args.forwards and not args.pipeline:
        print('error: --no-forwards leaves nothing to run without --pipeline', file=sys.stderr)
        return 1
    out: Dict[str, Any] = {'sizes': {}}
    if args.forwards:
        out = peer_forwards(args.sizes, args.frames, args.reps, tiny=args.tiny,
                            backends=args.backends, after_size=write)
    if args.pipeline:
        import diffusers
        out.setdefault('diffusers', diffusers.__version__)
        out.setdefault('torch', torch.__version__)
        out['pipeline'] = peer_pipelines(args.sizes, args.frames, args.steps, tiny=args.tiny)
        write(out)
    out.update(meta, seconds=time.perf_counter() - t0)
    write(out)
    for size, r in out.get('pipeline', {}).get('sizes', {}).items():
        for name, x in r.items():
            if isinstance(x, dict):
                print(f"{size} {name} pipeline: " + ('error ' + x['error'] if 'error' in x else
                      f"step {x['step_seconds']:.3f} s, decode {x['decode_seconds']:.2f} s, "
                      f"total {x['total_seconds']:.1f} s, 40 steps projected "
                      f"{x['projected_40_step_seconds']:.1f} s"))
    if not out['sizes']:
        return 0
    print(f"{'size':<10}{'ours s':>9}{'diffusers eager (best) s':>26}{'compiled s':>12}"
          f"{'ours vs compiled':>18}")
    for size, r in out['sizes'].items():
        ok = [v['seconds'] for v in r['diffusers_eager'].values() if 'seconds' in v]
        comp = r.get('diffusers_compiled', {}).get('seconds')
        print(f"{size:<10}{r['ours']['seconds']:>9.3f}{min(ok) if ok else float('nan'):>26.3f}"
              f"{comp if comp else float('nan'):>12.3f}"
              f"{r.get('ours_speedup_vs_diffusers_compiled', float('nan')):>17.3f}x")
    return 0


if __name__ == '__main__':
    sys.exit(main())
