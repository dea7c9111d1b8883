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
- attention: the fastest available kernel ('auto': FA3 > cuDNN SDPA > FA2 > SDPA; where
  several are installed, the first call at each size times them, and self- and
  cross-attention each take the one fastest on the video's own shapes);
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
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .modules.attention import pick_kernels, resolve_backend
from .modules.fp8 import (Fp8Schedule, fp8_weight_names, quantize_transform, set_fp8_compute_,
                          swap_linears_)
from .modules.model import WanModel
from .optimizations import (COMPILE_MODES, OptimizationConfig, apply_passes, backend_flags,
                            is_fsdp, quantize_parts, weight_dtype_mode)
from .text2video import WanT2V
from .utils.block_streaming import (SlotPair, StreamingBlockRunner, make_place,
                                    stream_blocks, unstream_blocks)
from .utils.checkpoint import chain
from .utils.dtype_policy import dtype_rule
from .utils.memory_plan import (STREAMED, MemoryPlan, ModelSizes, cpu_plan, log_plan,
                                plan_memory, vae_decode_bytes)
from .utils.offload import PinnedOffload
from .utils.placement import apply_gpu_cap, usable_gpu_bytes, usable_host_bytes
from .utils.random_init import build_on_meta
from .utils.validation import check_generation_args

__all__ = ['WanT2VOptimized', 'OptimizationConfig', 'optimize_pipeline', 'COMPILE_MODES']

# the experts by the planner's names, in run order (high noise first)
EXPERTS = (('high_noise', 'high_noise_model'), ('low_noise', 'low_noise_model'))


class WanT2VOptimized(WanT2V):
    """Drop-in WanT2V with exact-math speed-ups (see the module docstring).

    Keyword-only additions: `gpu_memory_gib` caps the GPU memory the pipeline may use
    (enforced on the caching allocator: a smaller GPU emulated on a large one, or a GPU
    shared with other work); `plan_size` = ((W, H), frame_num) is the video the models are
    placed for while they load (default the largest, 1280*720 x 81 frames; a later generate()
    at another size re-plans and moves what must move).
    """

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
                 ulysses_size: Optional[int] = None,
                 loras: Sequence = (),
                 loras_high: Sequence = (),
                 loras_low: Sequence = (),
                 high_noise_file: Optional[str] = None,
                 low_noise_file: Optional[str] = None,
                 data_parallel: int = 1,
                 gpu_memory_gib: Optional[float] = None,
                 plan_size: Optional[Tuple[Tuple[int, int], int]] = None):
        # set before the models are built: the experts load in its dtype policy and where
        # the load-time plan puts them
        self.opt = optimizations or OptimizationConfig(compile=enable_compile,
                                                       compile_mode=compile_mode,
                                                       tf32=enable_tf32, attention=attention)
        if dit_fsdp and quantize_parts(self.opt.quantize):
            raise ValueError('--quantize is not supported with FSDP-sharded experts '
                             '(--dit_fsdp): drop one of them')
        self.gpu_memory_gib = gpu_memory_gib
        self._plan_size = plan_size or ((1280, 720), 81)
        self._load_plan: Optional[MemoryPlan] = None
        self._streaming: Dict[str, StreamingBlockRunner] = {}
        self._slots = SlotPair()  # the GPU block slots every streamed expert shares
        target = WanT2V.resolve_device(device, device_id)
        if target.type == 'cuda' and gpu_memory_gib is not None:
            fraction = apply_gpu_cap(target, gpu_memory_gib)
            logging.info('GPU memory capped at %.1f GiB (%.3f of %s)', gpu_memory_gib,
                         fraction, torch.cuda.get_device_name(target))
        super().__init__(config, checkpoint_dir, device_id=device_id, rank=rank,
                         t5_fsdp=t5_fsdp, dit_fsdp=dit_fsdp, use_sp=use_sp, t5_cpu=t5_cpu,
                         init_on_cpu=init_on_cpu, convert_model_dtype=convert_model_dtype,
                         random_init=random_init, random_init_seed=random_init_seed,
                         device=device, cfg_parallel=cfg_parallel, ulysses_size=ulysses_size,
                         loras=loras, loras_high=loras_high, loras_low=loras_low,
                         high_noise_file=high_noise_file, low_noise_file=low_noise_file,
                         data_parallel=data_parallel)
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
        new.gpu_memory_gib = None
        new._plan_size = ((1280, 720), 81)
        new._load_plan = None
        new._streaming, new._slots = {}, SlotPair()
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
        # the attention kernels timed fastest, by (batch, tokens): {'self': .., 'cross': ..}
        self._kernel_picks: Dict[Tuple[int, int], Dict[str, str]] = {}
        self._plan: Optional[MemoryPlan] = None
        self._evicted: set = set()  # experts whose GPU weights left for a decode
        on_cuda = self.device.type == 'cuda'
        # CUDA only: cuDNN's native layout; on the CPU channels-last convs are slower
        self.vae.set_channels_last(opts.vae_channels_last and on_cuda)
        self._t5_offload = None
        self._t5_freed = False  # the planner's 'reload' placement dropped T5's weights
        if on_cuda and not is_fsdp(self.text_encoder.model):
            # pinned host copy: T5 moves to the GPU at full PCIe bandwidth (~0.5 s, not ~10 s)
            self._t5_offload = PinnedOffload(self.text_encoder.model)
        apply_passes(self, opts)
        self._fp8_schedule: Optional[Fp8Schedule] = None
        if opts.fp8_first_bf16_steps or opts.fp8_last_bf16_steps:
            self._fp8_schedule = Fp8Schedule(opts.fp8_first_bf16_steps,
                                             opts.fp8_last_bf16_steps)
            # the exact self-attention kernel of the bf16 steps
            self._exact_attention = resolve_backend('auto', self.device)
            logging.info('fp8 schedule: the first %d and last %d steps in bf16',
                         opts.fp8_first_bf16_steps, opts.fp8_last_bf16_steps)
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

    # ------------------------------------------------------------------ placement
    @property
    def plans_placement(self) -> bool:
        """One process on one GPU: the planner places (and may stream) the models. Under
        Ulysses, FSDP or CFG parallelism every rank keeps its models resident."""
        return self.device.type == 'cuda' and self.sp_size == 1 and not self.cfg_parallel and \
            not any(is_fsdp(m) for m in self._built_experts())

    def _built_experts(self):
        return [m for m in (getattr(self, 'low_noise_model', None),
                            getattr(self, 'high_noise_model', None)) if m is not None]

    def _meta_expert(self) -> WanModel:
        """An expert built on the meta device with the dtypes it will be stored in (its
        --quantize linears in fp8)."""
        model = build_on_meta(lambda: WanModel(**self._dit_kwargs()))
        self._swap_meta_linears(model)
        _cast_meta_(model, dtype_rule(WanModel, self.expert_dtype_mode(), self.param_dtype))
        return model

    def _swap_meta_linears(self, model: WanModel) -> None:
        """The --quantize linears of a meta expert become empty fp8 linears."""
        parts = quantize_parts(self.opt.quantize)
        if parts:
            swap_linears_(model, parts)

    def load_expert(self, name: str, seed: int, *, device, dtype_rule, before_load=None,
                    place=None, transform=None, fp8_keep=None) -> WanModel:
        """As WanT2V.load_expert; with --quantize the chosen linears are fp8 before any
        weight arrives and their weights are quantized as they stream in, on the compute
        device (`quantize_transform`): the expert never exists in bf16 where it is placed,
        and the values are those of quantizing the loaded bf16 linears. A scaled-fp8 file's
        e4m3 weights for those linears are taken as stored, with their scales."""
        if not quantize_parts(self.opt.quantize):
            return super().load_expert(name, seed, device=device, dtype_rule=dtype_rule,
                                       before_load=before_load, place=place,
                                       transform=transform, fp8_keep=fp8_keep)
        names: List[str] = []

        def before(model: WanModel) -> None:
            self._swap_meta_linears(model)
            names.extend(fp8_weight_names(model))
            if before_load is not None:
                before_load(model)

        model = super().load_expert(
            name, seed, device=device, dtype_rule=dtype_rule, before_load=before, place=place,
            transform=chain(transform, quantize_transform(names, self.device, dtype_rule)),
            fp8_keep=names)
        logging.info('%s expert: %d block linears quantized to fp8 while loading (%s)', name,
                     len(names), ', '.join(quantize_parts(self.opt.quantize)))
        return model

    def step_split(self, sample_solver: str, sampling_steps: int, shift: float
                   ) -> Tuple[int, int]:
        """(high-noise steps, low-noise steps) of a schedule at this pipeline's boundary."""
        _, ts = self.make_scheduler(sample_solver, sampling_steps, shift, 'cpu',
                                    self.num_train_timesteps)
        high = int((ts >= self.boundary * self.num_train_timesteps).sum())
        return high, len(ts) - high

    def _model_sizes(self, steps: Tuple[int, int], experts=None) -> ModelSizes:
        experts = experts or {name: getattr(self, attr) for name, attr in EXPERTS}
        return ModelSizes.from_modules(
            [(name, experts[name], n) for (name, _), n in zip(EXPERTS, steps)],
            self.text_encoder.model, self.vae.model)

    def _our_bytes(self) -> Tuple[int, int]:
        """(GPU, host) bytes our own models occupy now: the planner may reuse them."""
        gpu = host = 0
        tensors = [t for m in (*self._built_experts(), self.text_encoder.model,
                               self.vae.model) for t in (*m.parameters(), *m.buffers())]
        for t in {id(t): t for t in tensors}.values():
            n = t.numel() * t.element_size()
            if t.device.type == 'meta':  # freed (T5 under the 'reload' placement)
                continue
            if t.device.type == 'cuda':
                gpu += n
            else:
                host += n
        gpu += self._slots.nbytes
        return gpu, host

    def _budgets(self) -> Tuple[int, int]:
        """(GPU, host) bytes the planner may place our models in: what is free plus what our
        own models occupy now; on the GPU no more than the --gpu_memory_gib cap minus what
        others (not our models) hold."""
        ours_gpu, ours_host = self._our_bytes()
        gpu = usable_gpu_bytes(self.device) + ours_gpu
        if self.gpu_memory_gib is not None:
            others = torch.cuda.memory_allocated(self.device) - ours_gpu
            gpu = min(gpu, int(self.gpu_memory_gib * 2**30) - max(others, 0))
        return gpu, usable_host_bytes() + ours_host

    def plan_for(self, size: Tuple[int, int], frame_num: int, offload_model: bool = False,
                 batched_cfg: Optional[bool] = None,
                 steps: Optional[Tuple[int, int]] = None) -> MemoryPlan:
        """The placement plan for one generate() call (wan/utils/memory_plan.py): per expert
        resident or streamed, the CFG scheme, T5's placement, what leaves before the decode.
        `offload_model=True` streams every expert. `steps`: (high, low) step counts (default:
        the config's schedule)."""
        want_batched = self.opt.batched_cfg if batched_cfg is None else batched_cfg
        steps = steps or self.step_split('unipc', self.config.sample_steps,
                                         self.config.sample_shift)
        sizes = self._model_sizes(steps)
        if self.device.type != 'cuda':
            return cpu_plan(sizes, want_batched and not self.cfg_parallel, self.cfg_parallel)
        gpu_bytes, host_bytes = self._budgets()
        probe = self._vae_probe.get(self.target_shape(size, 9)[2:])
        return plan_memory(
            gpu_bytes, host_bytes, size, frame_num, sizes,
            want_batched_cfg=want_batched, want_resident=not offload_model, t5_cpu=self.t5_cpu,
            t5_streaming=False, per_sample_time=self.opt.per_sample_time,
            cfg_parallel=self.cfg_parallel,
            vae_decode_bytes_measured=None if probe is None else
            vae_decode_bytes(size, frame_num, chunk_peak_bytes=probe))

    def _initial_plan(self) -> MemoryPlan:
        """Where the experts go while they load (planned once, for `plan_size`)."""
        if self._load_plan is None:
            size, frames = self._plan_size
            steps = self.step_split('unipc', self.config.sample_steps, self.config.sample_shift)
            meta = {name: self._meta_expert() for name, _ in EXPERTS}
            sizes = self._model_sizes(steps, meta)
            gpu_bytes, host_bytes = self._budgets()
            plan = plan_memory(gpu_bytes, host_bytes, size, frames, sizes,
                               want_batched_cfg=self.opt.batched_cfg, t5_cpu=self.t5_cpu,
                               t5_streaming=False, per_sample_time=self.opt.per_sample_time)
            plan.raise_if_unfit()
            logging.info('load placement (planned for %dx%d, %d frames): %s', size[0],
                         size[1], frames, plan.describe())
            self._load_plan = plan
        return self._load_plan

    def _new_runner(self, blocks: nn.ModuleList) -> StreamingBlockRunner:
        """A streaming runner for `blocks`, sharing one pair of GPU slots between experts
        (only one expert runs at a time)."""
        return StreamingBlockRunner(blocks, self.device, self._slots)

    def _build_expert(self, subfolder, checkpoint_dir, seed, use_sp, dit_fsdp, shard_fn,
                      convert_model_dtype) -> nn.Module:
        """Load straight to the final placement, each tensor in its stored dtype: a resident
        expert from the file (or the random generator) to the GPU, a streamed one's blocks
        into one page-locked host buffer (its other weights to the GPU)."""
        if use_sp or dit_fsdp or not self.plans_placement:
            return super()._build_expert(subfolder, checkpoint_dir, seed, use_sp, dit_fsdp,
                                         shard_fn, convert_model_dtype)
        name = 'high_noise' if subfolder == self.config.high_noise_checkpoint else 'low_noise'
        streamed = self._initial_plan().expert(name).placement == STREAMED
        rule = dtype_rule(WanModel, self.expert_dtype_mode(), self.param_dtype)
        runner: List[StreamingBlockRunner] = []

        def before_load(model: WanModel) -> None:
            _cast_meta_(model, rule)
            runner.append(self._new_runner(model.blocks))

        def place(tensor_name: str, tensor: torch.Tensor) -> torch.Tensor:
            return make_place(runner[0], self.device)(tensor_name, tensor)

        hooks = dict(before_load=before_load, place=place) if streamed else {}
        logging.info('%s: %s', name, 'streamed from page-locked host memory' if streamed else
                     'resident on the GPU')
        model = self.load_expert(name, seed, device=self.device, dtype_rule=rule, **hooks)
        if streamed:
            runner[0].pin()
            model.block_runner = runner[0]
            self._streaming[name] = runner[0]
        return self._configure_model(model, use_sp, dit_fsdp, shard_fn, convert_model_dtype)

    def _place_expert(self, model: nn.Module) -> None:
        if not self.plans_placement:
            super()._place_expert(model)
        # else: _build_expert loaded it where the plan wants it

    def place_for(self, size: Tuple[int, int], frame_num: int, offload_model: bool = False,
                  batched_cfg: Optional[bool] = None,
                  steps: Optional[Tuple[int, int]] = None) -> MemoryPlan:
        """Plan for one generation and move the models where the plan puts them now (what
        generate() and warm_up() do first); PlacementError when it cannot fit."""
        plan = self.plan_for(size, frame_num, offload_model, batched_cfg, steps)
        log_plan(plan)
        plan.raise_if_unfit()
        self._apply_plan(plan)
        return plan

    def _apply_plan(self, plan: MemoryPlan) -> None:
        """Move what the plan places differently from now: stream or unstream experts, bring
        back experts that left for the last decode, T5 to its place, drop unused slots."""
        if not self.plans_placement:
            return
        self._t5_follow_plan(plan)
        # what leaves the GPU first, so that what comes in finds the room (a cap included)
        for name, attr in EXPERTS:
            if plan.expert(name).placement == STREAMED and name not in self._streaming:
                logging.info('%s: now streamed from host memory', name)
                self._streaming[name] = stream_blocks(getattr(self, attr), self.device,
                                                      self._slots)
        if not self._streaming:
            self._slots.release()
        torch.cuda.empty_cache()
        for name, attr in EXPERTS:
            if plan.expert(name).placement != STREAMED and name in self._streaming:
                logging.info('%s: now resident on the GPU', name)
                del self._streaming[name]
                unstream_blocks(getattr(self, attr), self.device)
            # its GPU-side weights back where they run (after a decode eviction, or an
            # adopted pipeline whose experts waited on the CPU)
            self._weights_to(name, self.device)
        if not self._streaming:
            self._slots.release()

    def _weights_to(self, name: str, device) -> None:
        """An expert's GPU-side weights (all of them when resident, the non-block ones when
        streamed) to `device`."""
        model = getattr(self, dict(EXPERTS)[name])
        block_params = {id(p) for p in model.blocks.parameters()} \
            if name in self._streaming else set()
        for p in model.parameters():
            if id(p) not in block_params and p.device != torch.device(device):
                p.data = p.data.to(device)
        model.freqs = model.freqs.to(device)
        if torch.device(device).type == 'cpu':
            self._evicted.add(name)
        else:
            self._evicted.discard(name)

    # ------------------------------------------------------------------ warm-up
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
        plan = self.place_for(size, frame_num, offload_model=False, batched_cfg=batched_cfg)
        shape = self.target_shape(size, frame_num)
        seq_len = self.seq_len_for(shape)
        batch = 2 if plan.batched_cfg else 1
        self._pick_attention_kernels(batch, seq_len)  # before compiling: the kernels are baked in
        lat = torch.zeros(*shape, device=self.device)
        # the T5 dtype under autocast; the compute dtype otherwise (as generate() casts it)
        ctx = torch.zeros(1, self.config.get('text_dim', 4096), device=self.device,
                          dtype=self.config.t5_dtype if self.half_precision else self.param_dtype)

        def forwards() -> None:
            for model, t in ((self.high_noise_model, self.num_train_timesteps - 1),
                             (self.low_noise_model, 0)):
                model([lat] * batch, t=torch.full((batch,), t, device=self.device),
                      context=[ctx] * batch, seq_len=seq_len)
        with self._autocast():
            if self._fp8_schedule is not None:  # the bf16 steps compile now too
                self._set_fp8_compute(False)
                forwards()
                self._set_fp8_compute(True)
            forwards()
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
        whatever is resident is measured instead of estimated, for the planner (it resets
        the CUDA peak-memory statistics of this device)."""
        if self.device.type != 'cuda' or self.rank != 0:
            return
        shape = self.target_shape(size, 9)  # (C, 3, H', W')
        key = shape[2:]
        if key in self._vae_probe:
            return
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        latent = torch.zeros(*shape, device=self.device)
        try:
            # the first decode autotunes (cuDNN tries algorithms with large workspaces when
            # memory is plentiful: measured 38.7 GiB at 832*480 on an H200); the second,
            # with the algorithms chosen, is the decode's own peak
            self.vae.decode([latent])
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.vae.decode([latent])
            peak = torch.cuda.max_memory_allocated(self.device) - base
        except torch.cuda.OutOfMemoryError:
            peak = None
        torch.cuda.empty_cache()
        self._vae_probe[key] = peak
        logging.info('VAE probe decode at %dx%d: %.1f s (autotuning included), peak %s',
                     size[0], size[1], time.perf_counter() - t0,
                     'out of memory' if peak is None else f'{peak / 2**30:.1f} GiB')

    def _pick_attention_kernels(self, batch: int, tokens: int) -> None:
        """With attention='auto', the fast exact kernels timed on this video's two attention
        shapes, the faster kept for each (`pick_kernels`): which wins depends on the GPU and
        the sequence length, and differs between self- and cross-attention (512 keys).
        Timed once per (batch, tokens) and pipeline; the picks are applied on every call."""
        if self.opt.attention != 'auto':
            return
        key = (batch, tokens)
        if key not in self._kernel_picks:
            c = self.config
            found = pick_kernels(batch, tokens, c.num_heads, c.dim // c.num_heads, c.text_len,
                                 self.device, self.sp_size)
            if found is None:  # not on a GPU, or only one fast kernel installed
                return
            picks, report = found
            if dist.is_available() and dist.is_initialized():
                # one kernel on every rank (timings differ a little between GPUs)
                choice = [picks]
                first = self.parallel_info.replica_ranks[0] if self.parallel_info else 0
                dist.broadcast_object_list(choice, src=first, group=self.group)
                picks = choice[0]
            self._kernel_picks[key] = picks
            logging.info('attention kernels at %d tokens: self %s, cross %s (ms per call: %s)',
                         tokens, picks['self'], picks['cross'], report)
        picks = self._kernel_picks[key]
        self.attention_backend = picks['self']
        for model in self.experts():
            model.options.attn_backend = picks['self']
            model.options.cross_attn_backend = picks['cross']

    # ------------------------------------------------------------------ hooks
    def _begin_step(self, index: int, num_steps: int) -> None:
        if self._fp8_schedule is not None:
            self._set_fp8_compute(self._fp8_schedule.use_fp8(index, num_steps))

    def _set_fp8_compute(self, on: bool) -> None:
        """fp8 linears and fp8 self-attention on (fp8 steps) or off (bf16 steps)."""
        for model in self.experts():
            set_fp8_compute_(model, on)
            if self.opt.attention == 'fa3_fp8':
                model.options.attn_backend = 'fa3_fp8' if on else self._exact_attention

    def _prepare_model_for_timestep(self, t, boundary, offload_model):
        if self._plan is None or not self.plans_placement:
            return super()._prepare_model_for_timestep(t, boundary, offload_model)
        # resident experts stay, streamed ones bring their blocks in as they run
        return self.high_noise_model if t.item() >= boundary else self.low_noise_model

    def _encode_text(self, prompts, offload_model):
        plan = self._plan
        t5_on_gpu = plan is not None and plan.t5 in ('gpu', 'gpu_then_freed')
        out = []
        for p in prompts:
            if self.opt.prompt_cache and p in self._prompt_cache:
                out.append(self._prompt_cache[p])
                continue
            if self._t5_freed:
                self._reload_text_encoder()
            if t5_on_gpu:
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
        if t5_on_gpu and plan.t5 == 'gpu_then_freed':
            self._t5_to('cpu')
        if plan is not None and plan.host.get('t5') == 'reload' and not self._t5_freed and \
                self.plans_placement:
            self._free_text_encoder()
        return out

    def _free_text_encoder(self) -> None:
        """The plan has no host room for T5 between encodes: drop its weights (the prompts
        already encoded stay cached); the next new prompt reads them again."""
        logging.info('T5 freed after encoding (no host room for it; read again when needed)')
        self._t5_to('cpu')
        self._t5_offload = None
        self.text_encoder.model.to('meta')
        self._t5_freed = True

    def _reload_text_encoder(self) -> None:
        self.text_encoder = self.build_text_encoder()
        if self.device.type == 'cuda':
            self._t5_offload = PinnedOffload(self.text_encoder.model)
        self._t5_freed = False

    def _t5_follow_plan(self, plan: MemoryPlan) -> None:
        """A T5 left on the GPU by an earlier call leaves when this plan has no room for it."""
        if plan.t5 != 'gpu':
            self._t5_to('cpu')

    def _t5_to(self, device) -> None:
        offload = getattr(self, '_t5_offload', None)
        if is_fsdp(self.text_encoder.model) or self._t5_freed:
            return  # sharded across the ranks' GPUs (it stays where FSDP put it), or freed
        if offload is None:
            self.text_encoder.model.to(device)
        elif torch.device(device).type == 'cpu':
            offload.to_host()
        elif not offload.on_device:
            offload.to_device(torch.device(device))

    def _expert_name(self, model) -> str:
        return 'high_noise' if model is self.high_noise_model else 'low_noise'

    def _predict_noise(self, model, latents, t, context, context_null, seq_len, guide_scale):
        if self.opt.cfg_skip and guide_scale == 1.0 and not self.cfg_parallel:
            # uncond + 1.0 * (cond - uncond) is cond, up to fp32 rounding: one pass
            return model([latents], t=torch.stack([t]), context=[context], seq_len=seq_len)[0]
        scheme = 'sequential' if self._plan is None else \
            self._plan.expert(self._expert_name(model)).cfg
        if scheme == 'batched' and not self.cfg_parallel:
            cond, uncond = model([latents, latents], t=torch.stack([t, t]),
                                 context=[context, context_null], seq_len=seq_len)
        elif scheme == 'interleaved' and not self.cfg_parallel:
            # two batch-1 passes run block by block: a streamed block is copied in once
            timestep = torch.stack([t])
            (cond,), (uncond,) = model.forward_passes(
                [([latents], timestep, [context]), ([latents], timestep, [context_null])],
                seq_len)
        else:  # two batch-1 passes as upstream, or CFG parallelism
            return super()._predict_noise(model, latents, t, context, context_null, seq_len,
                                          guide_scale)
        return uncond + guide_scale * (cond - uncond)

    def decode(self, x0):
        if self.device.type != 'cuda':
            return super().decode(x0)
        # cached activation blocks of the DiT are the wrong shapes for the VAE: return them
        torch.cuda.empty_cache()
        if self._plan is not None and self.plans_placement:
            for name in self._plan.decode_leaves:
                self._weights_to(name, 'cpu')
            torch.cuda.empty_cache()
        try:
            return super().decode(x0)
        except torch.cuda.OutOfMemoryError:
            # the estimate was optimistic for this GPU: make room rather than fail
            logging.warning('VAE decode ran out of GPU memory beside the experts; moving the '
                            'experts off the GPU and decoding again')
            for name, _ in EXPERTS:
                self._weights_to(name, 'cpu')
            torch.cuda.empty_cache()
            return super().decode(x0)

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
        """As WanT2V.generate. The memory planner places the models for this call:
        `offload_model=True` streams both experts' blocks from page-locked host memory (never
        whole-expert swaps); `False` keeps whatever fits resident. `use_batched_cfg`
        overrides the batched-CFG toggle."""
        with self._call_scope():
            return self._generate_planned(input_prompt, size, frame_num, shift, sample_solver,
                                          sampling_steps, guide_scale, n_prompt, seed,
                                          offload_model, use_batched_cfg)

    def _generate_planned(self, input_prompt, size, frame_num, shift, sample_solver,
                          sampling_steps, guide_scale, n_prompt, seed, offload_model,
                          use_batched_cfg):
        check_generation_args(size=size, frame_num=frame_num, shift=shift,
                              sample_solver=sample_solver, sampling_steps=sampling_steps,
                              seed=seed, num_train_timesteps=self.num_train_timesteps)
        steps = self.step_split(sample_solver, sampling_steps, shift)
        self._plan = self.place_for(size, frame_num, offload_model, use_batched_cfg, steps)
        # both no-ops after warm_up() or an earlier call at this size
        self._pick_attention_kernels(2 if self._plan.batched_cfg else 1,
                                     self.seq_len_for(self.target_shape(size, frame_num)))
        self._probe_vae(size)
        try:
            return super().generate(input_prompt, size=size, frame_num=frame_num, shift=shift,
                                    sample_solver=sample_solver, sampling_steps=sampling_steps,
                                    guide_scale=guide_scale, n_prompt=n_prompt, seed=seed,
                                    offload_model=offload_model)
        finally:
            self._plan = None


def _cast_meta_(model: nn.Module, rule) -> None:
    """Give a meta-device model's tensors the dtypes `rule` stores them in."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        dtype = rule(name, t)
        if t.dtype != dtype:
            t.data = t.data.to(dtype)


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
