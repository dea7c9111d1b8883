"""WanT2VOptimized: the same videos as WanT2V, faster on one GPU.

Every optimization is a named toggle of `OptimizationConfig` (wan/optimizations.py), applied
once by ordered passes right after the models are built. Those that keep the math (same
operations, differences at the rounding level of the dtype) are on by default; TF32 for the
fp32 matmuls changes the fp32 islands' precision and is opt-in.

- batched_cfg: conditional and unconditional in one batch-2 forward (the memory plan may fall
  back to two passes);
- per_sample_time: time MLP and 6*dim projection once per sample, broadcast over tokens
  (upstream runs them once per token: ~24 TFLOP of fp32 GEMM per 720p forward);
- fast_rope: RoPE from a cached fp32 cos/sin table instead of float64 complex products;
- attention: the fastest available kernel ('auto': FA3 > cuDNN SDPA > FA2 > SDPA);
- bf16_weights: the matmul weights, which upstream casts to bf16 on every call under
  autocast, are stored in bf16 as they load; the fp32 islands (time MLP, head, norms,
  modulation) keep fp32;
- compile: torch.compile of each transformer block (regional: one graph serves all 40 blocks
  of both experts, so compile time stays small), fusing the elementwise work (modulation,
  norms, RoPE, gates, residual adds) into few kernels;
- prompt_cache: a prompt is encoded once per pipeline;
- vae_cudnn_benchmark: cuDNN autotuning for the VAE decode convolutions (same math);
- vae_channels_last: the VAE convs in channels-last (NDHWC) layout, cuDNN's native tensor-core
  layout (same math, memory layout only; CUDA only: slower on the CPU);
- tf32 (opt-in): TF32 for the remaining fp32 matmuls.
Placement (what stays on the GPU) is decided per generate() call by the memory planner
(wan/utils/memory_plan.py) from `offload_model` and the free memory.

`optimize_pipeline(pipe, **toggles)` builds the optimized pipeline around an existing
WanT2V's models (same weights), with the same passes.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .modules.attention import attention, available_backends
from .optimizations import (COMPILE_MODES, OptimizationConfig, apply_passes, backend_flags,
                            is_fsdp, weight_dtype_mode)
from .text2video import WanT2V
from .utils.memory_plan import MemoryPlan, log_plan, plan_memory
from .utils.offload import PinnedOffload

__all__ = ['WanT2VOptimized', 'OptimizationConfig', 'optimize_pipeline', 'COMPILE_MODES']

class WanT2VOptimized(WanT2V):
    """Drop-in WanT2V with exact-math speed-ups (see the module docstring)."""

    def __init__(self,
                 config,
                 checkpoint_dir: Optional[str],
                 device_id: int = 0,
                 rank: int = 0,
                 t5_fsdp: bool = False,
                 dit_fsdp: bool = False,
                 use_sp: bool = False,
                 t5_cpu: bool = False,
                 init_on_cpu: bool = True,
                 convert_model_dtype: bool = False,
                 *,
                 enable_compile: bool = True,
                 compile_mode: str = 'default',
                 enable_tf32: bool = False,
                 attention: str = 'auto',
                 optimizations: Optional[OptimizationConfig] = None,
                 random_init: bool = False,
                 random_init_seed: int = 0,
                 device: Optional[Union[str, torch.device]] = None,
                 cfg_parallel: bool = False,
                 ulysses_size: Optional[int] = None):
        # set before the models are built: the experts load in its dtype policy
        self.opt = optimizations or OptimizationConfig(compile=enable_compile,
                                                       compile_mode=compile_mode,
                                                       tf32=enable_tf32, attention=attention)
        super().__init__(config, checkpoint_dir, device_id=device_id, rank=rank,
                         t5_fsdp=t5_fsdp, dit_fsdp=dit_fsdp, use_sp=use_sp, t5_cpu=t5_cpu,
                         init_on_cpu=init_on_cpu, convert_model_dtype=convert_model_dtype,
                         random_init=random_init, random_init_seed=random_init_seed,
                         device=device, cfg_parallel=cfg_parallel, ulysses_size=ulysses_size)
        self._optimize()

    @classmethod
    def from_pipeline(cls, pipe: WanT2V, optimizations: OptimizationConfig
                      ) -> 'WanT2VOptimized':
        """An optimized pipeline around `pipe`'s models (the same module objects: the passes
        edit them in place, so `pipe` itself should not be used afterwards)."""
        if isinstance(pipe, WanT2VOptimized):
            raise ValueError('pipeline is already optimized')
        new = cls.__new__(cls)
        new.__dict__.update(vars(pipe))
        new.opt = optimizations
        new._optimize()
        return new

    def expert_dtype_mode(self) -> str:
        return weight_dtype_mode(self.opt, self.half_precision, self.convert_model_dtype)

    # ------------------------------------------------------------------ setup
    def _optimize(self) -> None:
        opts = self.opt
        self._prompt_cache: Dict[str, torch.Tensor] = {}
        # latent (H', W') -> peak bytes of a short probe decode (None: it ran out of memory)
        self._vae_probe: Dict[Tuple[int, int], Optional[int]] = {}
        self._plan: Optional[MemoryPlan] = None
        on_cuda = self.device.type == 'cuda'
        # CUDA only: cuDNN's native layout; on the CPU channels-last convs are slower
        self.vae.set_channels_last(opts.vae_channels_last and on_cuda)
        self._t5_offload = None
        if on_cuda and not is_fsdp(self.text_encoder.model):
            # pinned host copy: T5 moves to the GPU at full PCIe bandwidth (~0.5 s, not ~10 s)
            self._t5_offload = PinnedOffload(self.text_encoder.model)
        apply_passes(self, opts)
        ran = dict(opts.as_dict(), compile=self.compiled,
                   vae_channels_last=self.vae.channels_last,
                   tf32=opts.tf32 and on_cuda, vae_cudnn_benchmark=opts.vae_cudnn_benchmark
                   and on_cuda)
        logging.info('optimizations in effect: %s; attention kernel: %s', ran,
                     self.attention_backend)

    @contextmanager
    def _call_scope(self):
        """Process-wide switches of this configuration, for one call (restored after)."""
        with backend_flags(self.opt, self.device):
            yield

    # ------------------------------------------------------------------ memory plan
    def plan_for(self, size: Tuple[int, int], frame_num: int,
                 offload_model: bool = False, batched_cfg: Optional[bool] = None) -> MemoryPlan:
        """The placement plan for one generate() call (logged)."""
        want_batched = self.opt.batched_cfg if batched_cfg is None else batched_cfg
        # CFG parallelism: one pass per rank, never a batch of two
        want_batched = want_batched and not getattr(self, 'cfg_parallel', False)
        want_resident = not offload_model
        if self.device.type != 'cuda':
            plan = MemoryPlan(fits=True, experts_resident=True, batched_cfg=want_batched,
                              t5_on_gpu=False, t5_offload_after_encode=False,
                              offload_experts_before_decode=False, budget_gib=0.0,
                              notes=['CPU run: no GPU memory to plan'])
            return plan
        expert_bytes = max(_param_bytes(self.low_noise_model),
                           _param_bytes(self.high_noise_model))
        free = _free_gpu_bytes(self.device)
        # memory already held by our own models on the GPU is available to the plan
        ours = sum(_param_bytes(m, on_device=self.device) for m in (
            self.low_noise_model, self.high_noise_model, self.text_encoder.model))
        c = self.config
        plan = plan_memory(free + ours, size, frame_num, dim=c.dim, ffn_dim=c.ffn_dim,
                           num_layers=c.num_layers, expert_bytes=expert_bytes,
                           t5_bytes=_param_bytes(self.text_encoder.model), t5_cpu=self.t5_cpu,
                           want_batched_cfg=want_batched, want_resident=want_resident,
                           per_token_time=not self.opt.per_sample_time)
        if not plan.fits:
            raise torch.cuda.OutOfMemoryError(
                f'not enough GPU memory for {size[0]}x{size[1]}, {frame_num} frames: '
                + plan.describe())
        return plan

    @torch.no_grad()
    def warm_up(self, size: Tuple[int, int], frame_num: int,
                batched_cfg: Optional[bool] = None) -> float:
        """Run one forward of each expert at this size so that compilation (and cuDNN/cuBLAS
        autotuning) happens now rather than inside the first denoising steps; returns seconds.
        """
        with self._call_scope():
            return self._warm_up(size, frame_num, batched_cfg)

    def _warm_up(self, size, frame_num, batched_cfg) -> float:
        t0 = time.perf_counter()
        plan = self.plan_for(size, frame_num, offload_model=False, batched_cfg=batched_cfg)
        shape = self.target_shape(size, frame_num)
        seq_len = self.seq_len_for(shape)
        batch = 2 if plan.batched_cfg else 1
        self._t5_follow_plan(plan)
        # under Ulysses each rank's cross-attention sees its own share of the tokens
        self._pick_cross_attention_kernel(batch, seq_len // self.sp_size)
        lat = torch.zeros(*shape, device=self.device)
        # the T5 dtype under autocast; the compute dtype otherwise (as generate() casts it)
        ctx = torch.zeros(1, self.config.get('text_dim', 4096), device=self.device,
                          dtype=self.config.t5_dtype if self.half_precision else self.param_dtype)
        with self._autocast():
            for model, t in ((self.high_noise_model, self.num_train_timesteps - 1),
                             (self.low_noise_model, 0)):
                moved = next(model.parameters()).device != self.device
                if plan.experts_resident:
                    self._experts_to(self.device)
                else:
                    model.to(self.device)
                model([lat] * batch, t=torch.full((batch,), t, device=self.device),
                      context=[ctx] * batch, seq_len=seq_len)
                if moved and not plan.experts_resident:
                    model.to('cpu')
        self._probe_vae(size)
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        logging.info('warm-up (compile and autotuning included) at %dx%d, %d frames: %.1f s',
                     size[0], size[1], frame_num, seconds)
        return seconds

    @torch.no_grad()
    def _probe_vae(self, size: Tuple[int, int]) -> None:
        """Decode a 3-latent-frame clip at this size, once per size and process, on the rank
        that decodes. With cuDNN autotuning on, every decoder conv shape is tuned here (every
        later chunk of a decode repeats these shapes); and the decode's peak memory beside
        whatever is resident is measured instead of estimated, so that decode() can keep the
        experts on the GPU when the planner's estimate was pessimistic. (It resets the CUDA
        peak-memory statistics of this device.)"""
        if self.device.type != 'cuda' or self.rank != 0:
            return
        shape = self.target_shape(size, 9)  # (C, 3, H', W')
        key = (shape[2], shape[3])
        if key in self._vae_probe:
            return
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            self.vae.decode([torch.zeros(*shape, device=self.device)])
            peak = torch.cuda.max_memory_allocated(self.device) - base
        except torch.cuda.OutOfMemoryError:
            peak = None
        torch.cuda.empty_cache()
        self._vae_probe[key] = peak
        logging.info('VAE probe decode at %dx%d: %.1f s (autotuning included), peak %s',
                     size[0], size[1], time.perf_counter() - t0,
                     'out of memory' if peak is None else f'{peak / 2**30:.1f} GiB')

    def _decode_fits_beside_experts(self, x0: torch.Tensor) -> bool:
        """The probe's per-chunk peak plus the whole output video (held about three times
        over: the chunk list, the concatenation, the contiguous copy) and 1 GiB to spare,
        against the GPU memory free now."""
        peak = self._vae_probe.get((x0.shape[-2], x0.shape[-1]))
        if peak is None:
            return False
        frames = 1 + self.vae_stride[0] * (x0.shape[1] - 1)
        video = 3 * frames * x0.shape[-2] * self.vae_stride[1] * x0.shape[-1] * \
            self.vae_stride[2] * 4
        return peak + 3 * video + 2**30 <= _free_gpu_bytes(self.device)

    def _pick_cross_attention_kernel(self, batch: int, tokens: int) -> None:
        """With attention='auto', time the fast kernels on the real cross-attention shape
        (video tokens x 512 text keys) and keep the faster; the self-attention pick does not
        carry over to this very different shape."""
        candidates = [b for b in ('fa3', 'cudnn') if b in available_backends()]
        if self.opt.attention != 'auto' or len(candidates) < 2 or self.device.type != 'cuda':
            return
        c = self.config
        shape_q = (batch, tokens, c.num_heads, c.dim // c.num_heads)
        shape_k = (batch, c.text_len, c.num_heads, c.dim // c.num_heads)
        q = torch.randn(shape_q, device=self.device, dtype=torch.bfloat16)
        k, v = (torch.randn(shape_k, device=self.device, dtype=torch.bfloat16)
                for _ in range(2))
        times = {}
        for backend in candidates:
            attention(q, k, v, backend=backend)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                attention(q, k, v, backend=backend)
            end.record()
            torch.cuda.synchronize(self.device)
            times[backend] = start.elapsed_time(end) / 3
        best = min(times, key=times.get)
        if dist.is_available() and dist.is_initialized():
            # one kernel on every rank (timings differ a little between GPUs)
            choice = [best]
            dist.broadcast_object_list(choice, src=0)
            best = choice[0]
        self.low_noise_model.options.cross_attn_backend = best
        self.high_noise_model.options.cross_attn_backend = best
        logging.info('cross-attention kernel: %s (ms per call: %s)', best,
                     {k: round(v, 3) for k, v in times.items()})

    # ------------------------------------------------------------------ hooks
    def _prepare_model_for_timestep(self, t, boundary, offload_model):
        if self._plan is not None and self._plan.experts_resident:
            self._experts_to(self.device)
            return self.high_noise_model if t.item() >= boundary else self.low_noise_model
        return super()._prepare_model_for_timestep(t, boundary, True)

    def _encode_text(self, prompts, offload_model):
        plan = self._plan
        out = []
        for p in prompts:
            if self.opt.prompt_cache and p in self._prompt_cache:
                out.append(self._prompt_cache[p])
                continue
            if plan is not None and plan.t5_on_gpu:
                self._t5_to(self.device)
                ctx = self.text_encoder([p], self.device)[0]
            elif self.device.type == 'cuda':
                self._t5_to('cpu')
                ctx = self.text_encoder([p], torch.device('cpu'))[0].to(self.device)
            else:
                ctx = self.text_encoder([p], self.device)[0]
            if self.opt.prompt_cache:
                self._prompt_cache[p] = ctx
            out.append(ctx)
        if plan is not None and plan.t5_on_gpu and (plan.t5_offload_after_encode or
                                                    offload_model):
            self._t5_to('cpu')
        return out

    def _t5_follow_plan(self, plan: MemoryPlan) -> None:
        """A T5 left on the GPU by an earlier call leaves when this plan has no room for it."""
        if not plan.t5_on_gpu or plan.t5_offload_after_encode:
            self._t5_to('cpu')

    def _t5_to(self, device) -> None:
        offload = getattr(self, '_t5_offload', None)
        if is_fsdp(self.text_encoder.model):
            return  # sharded across the ranks' GPUs: it stays where FSDP put it
        if offload is None:
            self.text_encoder.model.to(device)
        elif torch.device(device).type == 'cpu':
            offload.to_host()
        elif not offload.on_device:
            offload.to_device(torch.device(device))

    def _predict_noise(self, model, latents, t, context, context_null, seq_len, guide_scale):
        if self.opt.cfg_skip and guide_scale == 1.0 and not self.cfg_parallel:
            # uncond + 1.0 * (cond - uncond) is cond, up to fp32 rounding: one pass
            return model([latents], t=torch.stack([t]), context=[context], seq_len=seq_len)[0]
        # CFG parallelism (handled by WanT2V._predict_noise) wins over batched CFG
        if self._plan is None or not self._plan.batched_cfg or self.cfg_parallel:
            return super()._predict_noise(model, latents, t, context, context_null, seq_len,
                                          guide_scale)
        cond, uncond = model([latents, latents], t=torch.stack([t, t]),
                             context=[context, context_null], seq_len=seq_len)
        return uncond + guide_scale * (cond - uncond)

    def decode(self, x0):
        if self.device.type != 'cuda':
            return super().decode(x0)
        # cached activation blocks of the DiT are the wrong shapes for the VAE: return them
        torch.cuda.empty_cache()
        if self._plan is not None and self._plan.offload_experts_before_decode:
            if self._decode_fits_beside_experts(x0):
                # the measured decode fits: moving 53 GB of experts to the host and back
                # would cost more than the decode itself
                logging.info('VAE decode beside the resident experts (probe measured it fits)')
            else:
                self._offload_experts()
        try:
            return super().decode(x0)
        except torch.cuda.OutOfMemoryError:
            # the estimate was optimistic for this GPU: make room rather than fail
            logging.warning('VAE decode ran out of GPU memory beside the experts; moving the '
                            'experts to the CPU and decoding again')
            self._offload_experts()
            return super().decode(x0)

    def _offload_experts(self) -> None:
        self._experts_to('cpu')
        torch.cuda.empty_cache()

    def _experts_to(self, device) -> None:
        # Plain moves: pinning 53 GiB of host memory took 95 s on the H100 machine, more than
        # it saves (see OPTIMIZATION_ANALYSIS.md).
        for m in (self.low_noise_model, self.high_noise_model):
            if not is_fsdp(m) and next(m.parameters()).device != torch.device(device):
                m.to(device)

    # ------------------------------------------------------------------ generate
    def generate(self,
                 input_prompt: str,
                 size: Tuple[int, int] = (1280, 720),
                 frame_num: int = 81,
                 shift: float = 5.0,
                 sample_solver: str = 'unipc',
                 sampling_steps: int = 50,
                 guide_scale: Union[float, Tuple[float, float]] = 5.0,
                 n_prompt: str = '',
                 seed: int = -1,
                 offload_model: bool = True,
                 *,
                 use_batched_cfg: Optional[bool] = None) -> Optional[torch.Tensor]:
        """As WanT2V.generate. `offload_model=True` keeps the reference's offloading (experts
        swapped in the loop and moved to the CPU afterwards); `False` lets the memory plan
        keep everything resident. `use_batched_cfg` overrides the batched-CFG toggle."""
        with self._call_scope():
            return self._generate_planned(input_prompt, size, frame_num, shift, sample_solver,
                                          sampling_steps, guide_scale, n_prompt, seed,
                                          offload_model, use_batched_cfg)

    def _generate_planned(self, input_prompt, size, frame_num, shift, sample_solver,
                          sampling_steps, guide_scale, n_prompt, seed, offload_model,
                          use_batched_cfg):
        self._plan = self.plan_for(size, frame_num, offload_model, use_batched_cfg)
        log_plan(self._plan)
        self._t5_follow_plan(self._plan)
        if self._plan.experts_resident:
            self._probe_vae(size)  # no-op after warm_up() or an earlier call at this size
        if self._plan.experts_resident:
            # before the loop, so that no step pays for a host-to-device copy
            self._experts_to(self.device)
        try:
            return super().generate(input_prompt, size=size, frame_num=frame_num, shift=shift,
                                    sample_solver=sample_solver, sampling_steps=sampling_steps,
                                    guide_scale=guide_scale, n_prompt=n_prompt, seed=seed,
                                    offload_model=offload_model)
        finally:
            self._plan = None


def _free_gpu_bytes(device: torch.device) -> int:
    """Free GPU memory, counting blocks the caching allocator holds but does not use."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
        torch.cuda.memory_allocated(device)


def _param_bytes(module: nn.Module, on_device: Optional[torch.device] = None) -> int:
    total = 0
    for p in module.parameters():
        if on_device is None or p.device == on_device:
            total += p.numel() * p.element_size()
    return total


def optimize_pipeline(pipe: WanT2V, **toggles) -> WanT2VOptimized:
    """The optimized pipeline around an existing WanT2V's models (same weights, no reload).

    `toggles` are OptimizationConfig fields (e.g. compile=False, batched_cfg=True). The
    returned pipeline shares `pipe`'s models, which the passes edit in place: use the
    returned object from then on (`pipe = optimize_pipeline(pipe)`).
    """
    valid = {f for f in OptimizationConfig.__dataclass_fields__}
    unknown = sorted(set(toggles) - valid)
    if unknown:
        raise TypeError(f'unknown optimization toggles {unknown}; valid: {sorted(valid)}')
    return WanT2VOptimized.from_pipeline(pipe, OptimizationConfig(**toggles))
