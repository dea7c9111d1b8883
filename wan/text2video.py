"""WanT2V: the reference text-to-video pipeline (docs/PIPELINE.md; upstream wan/text2video.py).

Two DiT experts switched on the integer timestep (high noise for t >= boundary), the umT5
encoder, the Wan2.1 VAE and a flow-matching solver. This class computes what the reference
computes; `WanT2VOptimized` (wan/text2video_optimized.py) overrides the hooks marked below to
run the same math faster.
"""
from __future__ import annotations

import gc
import logging
import math
import os
from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

from .distributed.util import agree_on_seed
from .modules.model import ForwardOptions, WanModel
from .modules.t5 import T5EncoderModel
from .modules.vae2_1 import Wan2_1_VAE
from .utils.checkpoint import chain, check_checkpoint_dir, module_tensor_shapes
from .utils.dtype_policy import dtype_rule
from .utils.fm_solvers import (FlowDPMSolverMultistepScheduler, get_sampling_sigmas,
                               retrieve_timesteps)
from .utils.fm_solvers_euler import FlowEulerScheduler
from .utils.fm_solvers_unipc import FlowUniPCMultistepScheduler
from .utils.lora import lora_merge_transform
from .utils.random_init import build_on_meta
from .utils.timing import PipelineObserver
from .utils.validation import check_device_fits, check_generation_args

__all__ = ['WanT2V', 'check_checkpoint_dir', 'SOLVERS']


def _read_loras(*groups: Sequence) -> list:
    """LoRA arguments (paths, 'PATH:STRENGTH' or LoraSpec) read and checked now."""
    from .utils.lora import LoraSpec, load_lora, parse_lora_arg
    specs = [s if isinstance(s, LoraSpec) else parse_lora_arg(str(s))
             for group in groups for s in group]
    return [load_lora(spec) for spec in specs]

# sample_solver values: upstream's two, and flow-matching Euler
SOLVERS = ('unipc', 'dpm++', 'euler')

T5_ARCH_KEYS = {'t5_vocab_size': 'vocab_size', 't5_dim': 'dim', 't5_dim_attn': 'dim_attn',
                't5_dim_ffn': 'dim_ffn', 't5_num_heads': 'num_heads',
                't5_num_layers': 'encoder_layers', 't5_num_buckets': 'num_buckets'}


class WanT2V:

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
                 data_parallel: int = 1):
        """Build the pipeline from `checkpoint_dir` (layout: docs/CHECKPOINTS.md#folder-layout).

        Keyword-only additions: `random_init` builds every component with deterministic
        random weights (seeded by `random_init_seed`) instead of reading a checkpoint, with
        the experts materialised directly on the GPU; `device` overrides the device (default
        `cuda:{device_id}`, or the CPU when CUDA is absent). `cfg_parallel` runs the
        conditional and unconditional passes on the two halves of the world
        (wan/distributed/cfg_parallel.py); `ulysses_size` is the Ulysses degree (default: the
        world size, halved with cfg_parallel, when use_sp; 1 otherwise).
        `checkpoint_dir` may also hold the Diffusers layout or ComfyUI single files
        (wan/utils/formats.py), or give the experts as `high_noise_file` / `low_noise_file`.
        `data_parallel` > 1 splits the world into that many replicas of the pipeline (each
        cfg x ulysses ranks), each generating its own videos; `rank` then counts inside the
        replica (its rank 0 decodes).
        `loras` (both experts), `loras_high`, `loras_low` (one expert): LoRA files, each a path,
        'PATH:STRENGTH' or a `wan.utils.lora.LoraSpec`, merged into the weights as they load
        (wan/utils/lora.py).
        """
        # Distributed layout (SP / CFG parallel): validated before any collective, so that a
        # bad combination fails identically on every rank instead of hanging.
        self.cfg_parallel = cfg_parallel
        self.sp_group = self.cfg_group = None
        # the ranks this pipeline's own collectives run over (None: the world)
        self.group = None
        self.sp_size = 1
        self.parallel_info = None
        self.data_parallel = data_parallel
        if use_sp or cfg_parallel or data_parallel > 1:
            from .distributed.cfg_parallel import make_groups, parallel_layout, replica_group
            from .distributed.sequence_parallel import check_sp_heads
            from .distributed.util import get_world_size
            world = get_world_size()
            if world == 1:
                raise ValueError('use_sp / cfg_parallel / data_parallel need an initialized '
                                 'process group with more than one rank (torchrun '
                                 '--nproc_per_node=N)')
            if data_parallel < 1 or world % data_parallel:
                raise ValueError(f'data_parallel {data_parallel} must divide the world size '
                                 f'{world}')
            if ulysses_size is None and not use_sp:
                ulysses_size = 1
            _, ulysses_size = parallel_layout(world // data_parallel, ulysses_size,
                                              cfg_parallel)
            if use_sp:
                check_sp_heads(config.num_heads, ulysses_size)
                self.sp_size = ulysses_size
            elif ulysses_size != 1:
                raise ValueError(f'ulysses_size {ulysses_size} > 1 needs use_sp=True')
            self.sp_group, self.cfg_group, self.parallel_info = make_groups(
                world, ulysses_size, cfg_parallel, data_parallel)
            self.group = replica_group(self.parallel_info)
            rank = self.parallel_info.replica_rank
        self.device = self.resolve_device(device, device_id)
        # a machine that cannot hold the task is refused before anything is read
        from .configs import WAN_CONFIGS
        check_device_fits(config, next((k for k, v in WAN_CONFIGS.items() if v is config),
                                       config.get('__name__', 'this task')), self.device)
        self.config = config
        self.rank = rank
        self.t5_cpu = t5_cpu
        self.init_on_cpu = init_on_cpu
        self.num_train_timesteps = config.num_train_timesteps
        self.boundary = config.boundary
        self.param_dtype = config.param_dtype
        if t5_fsdp or dit_fsdp or use_sp or cfg_parallel:
            self.init_on_cpu = False
        # every file checked before anything large is read: the checkpoint's layout and
        # completeness, each LoRA file and its keys
        self.layout = None if random_init else self.find_checkpoint(
            config, checkpoint_dir, high_noise_file, low_noise_file)
        self._loras = {'high_noise': _read_loras(loras, loras_high),
                       'low_noise': _read_loras(loras, loras_low)}
        self.random_init = random_init

        if convert_model_dtype and self.device.type != 'cuda':
            # CPU autocast has no fp32 mode, so bf16 weights could not be upcast inside the
            # fp32 islands; on CPU the experts keep fp32 weights (numerically the reference
            # default without --convert_model_dtype).
            logging.info('convert_model_dtype ignored on %s', self.device)
            convert_model_dtype = False
        self.convert_model_dtype = convert_model_dtype

        shard_fn = None
        if t5_fsdp or dit_fsdp:
            from .distributed.fsdp import shard_model
            # **kw: T5EncoderModel calls shard_fn(model, sync_module_states=False)
            # shards within this pipeline's ranks (a replica's, under data parallelism)
            shard_fn = lambda m, **kw: shard_model(m, device_id=self.device,  # noqa: E731
                                                   process_group=self.group, **kw)

        self._t5_recipe = dict(checkpoint_dir=checkpoint_dir, random_init_seed=random_init_seed,
                               shard_fn=shard_fn if t5_fsdp else None)
        self.text_encoder = self.build_text_encoder()

        self.vae_stride = config.vae_stride
        self.patch_size = config.patch_size
        logging.info('loading %s', 'random VAE weights' if random_init else
                     self.layout.vae.describe())
        vae_source = None if random_init or self.layout.vae.layout == 'original' else \
            self.layout.vae
        self.vae = Wan2_1_VAE(
            vae_pth=None if random_init or vae_source else os.path.join(checkpoint_dir,
                                                                        config.vae_checkpoint),
            device=self.device,
            dim=config.get('vae_dim', 96),
            random_init_seed=random_init_seed + 1 if random_init else None,
            source=vae_source)

        # low-noise expert first, then high-noise, as the reference
        self.low_noise_model = self._build_expert(config.low_noise_checkpoint, checkpoint_dir,
                                                  random_init_seed + 2, use_sp, dit_fsdp,
                                                  shard_fn, convert_model_dtype)
        self.high_noise_model = self._build_expert(config.high_noise_checkpoint, checkpoint_dir,
                                                   random_init_seed + 3, use_sp, dit_fsdp,
                                                   shard_fn, convert_model_dtype)
        self.sample_neg_prompt = config.sample_neg_prompt
        self.observers: List[PipelineObserver] = []

    # ------------------------------------------------------------------ stages
    def add_observer(self, observer: PipelineObserver) -> PipelineObserver:
        """Follow this pipeline's stages (wan/utils/timing.py); returns the observer."""
        self.observers.append(observer)
        return observer

    def remove_observer(self, observer: PipelineObserver) -> None:
        self.observers.remove(observer)

    @contextmanager
    def stage(self, name: str, **info):
        """Announce one stage of generate() to the observers (and to torch.profiler as a
        `wan::name` range); yields the stage's info dict, which the stage may extend."""
        with torch.profiler.record_function(f'wan::{name}'):
            for observer in self.observers:
                observer.stage_started(name, info)
            yield info
            for observer in reversed(self.observers):
                observer.stage_finished(name, info)

    # ------------------------------------------------------------------ construction
    def build_text_encoder(self) -> T5EncoderModel:
        """The umT5 encoder from this pipeline's checkpoint (or its seeded random weights),
        on the CPU. Called once at construction; the optimized pipeline calls it again when
        the memory plan freed the encoder to make host room ('reload')."""
        config, recipe = self.config, self._t5_recipe
        checkpoint_dir, random_init = recipe['checkpoint_dir'], self.random_init
        t5_arch = {v: config[k] for k, v in T5_ARCH_KEYS.items() if k in config}
        t5_source = None if random_init or self.layout.t5.layout == 'original' else \
            self.layout.t5
        logging.info('loading %s', 'random T5 weights' if random_init else
                     self.layout.t5.describe())
        # random weights are drawn where the fill is fast (the GPU), then kept on the CPU
        # like a loaded checkpoint
        encoder = T5EncoderModel(
            text_len=config.text_len,
            dtype=config.t5_dtype,
            device=self.device if random_init else torch.device('cpu'),
            checkpoint_path=None if random_init or t5_source else os.path.join(
                checkpoint_dir, config.t5_checkpoint),
            tokenizer_path=self.layout.tokenizer.path if self.layout is not None else (
                os.path.join(checkpoint_dir, config.t5_tokenizer) if checkpoint_dir else None),
            shard_fn=recipe['shard_fn'],
            arch=t5_arch or None,
            random_init_seed=recipe['random_init_seed'] if random_init else None,
            source=t5_source)
        encoder.model.to('cpu')
        return encoder

    @staticmethod
    def resolve_device(device: Optional[Union[str, torch.device]],
                       device_id: int = 0) -> torch.device:
        """`device`, else `cuda:{device_id}`, else the CPU when CUDA is absent."""
        if device is not None:
            return torch.device(device)
        return torch.device(f'cuda:{device_id}') if torch.cuda.is_available() else \
            torch.device('cpu')

    def _dit_kwargs(self) -> dict:
        c = self.config
        kw = dict(model_type='t2v', patch_size=c.patch_size, text_len=c.text_len, dim=c.dim,
                  ffn_dim=c.ffn_dim, freq_dim=c.freq_dim, num_heads=c.num_heads,
                  num_layers=c.num_layers, window_size=c.window_size, qk_norm=c.qk_norm,
                  cross_attn_norm=c.cross_attn_norm, eps=c.eps)
        if 'text_dim' in c:
            kw['text_dim'] = c.text_dim
        return kw

    def experts(self) -> Tuple[torch.nn.Module, torch.nn.Module]:
        """(low-noise expert, high-noise expert)."""
        return self.low_noise_model, self.high_noise_model

    def expert_dtype_mode(self) -> str:
        """The experts' dtype policy (wan/utils/dtype_policy.py), applied per tensor while
        they load: upstream keeps the checkpoint's dtype, or with --convert_model_dtype stores
        everything in param_dtype (the same values upstream's conversion after loading gives,
        without a full fp32 copy in host memory first)."""
        return 'all' if self.convert_model_dtype else 'checkpoint'

    @staticmethod
    def find_checkpoint(config, checkpoint_dir: Optional[str],
                        high_noise_file: Optional[str] = None,
                        low_noise_file: Optional[str] = None):
        """The checkpoint's layout (wan/utils/formats.py: original, Diffusers, ComfyUI files),
        checked complete before anything is built: CheckpointError (or FileNotFoundError)
        naming what was found and what is missing. An original-layout folder is checked
        deeply (every shard, header, archive: wan/utils/checkpoint.py)."""
        import glob

        from .utils.formats import detect_layout
        other = checkpoint_dir is not None and (
            os.path.isfile(os.path.join(checkpoint_dir, 'model_index.json')) or
            os.path.isdir(os.path.join(checkpoint_dir, 'transformer')) or
            bool(glob.glob(os.path.join(checkpoint_dir, '*.safetensors'))))
        if not other and high_noise_file is None and low_noise_file is None:
            check_checkpoint_dir(config, checkpoint_dir)  # the released layout, deeply
        layout = detect_layout(checkpoint_dir, high_noise_file=high_noise_file,
                               low_noise_file=low_noise_file, config=config)
        if layout.kind != 'original':
            logging.info('checkpoint layout %s: sampling keeps this task\'s defaults (shift '
                         '%s, boundary %s, guidance %s), whatever the folder\'s scheduler '
                         'config says', layout.kind, config.sample_shift, config.boundary,
                         config.sample_guide_scale)
        return layout

    def load_expert(self, name: str, seed: int, *, device: Union[str, torch.device],
                    dtype_rule, before_load=None, place=None, transform=None,
                    fp8_keep=None) -> WanModel:
        """One expert ('high_noise' or 'low_noise'), from this pipeline's checkpoint layout or
        random weights, each tensor in its `dtype_rule` dtype, on `device` (or where `place`
        puts it), its LoRAs merged (as the tensors stream in: in the file's dtype, then
        cast); `transform` (a loader stream transform, e.g. fp8 quantization) runs on the
        merged weights; `fp8_keep`: the weights a scaled-fp8 file may hand over as stored
        (WanModel.from_source; not with LoRAs, which merge into dequantized weights)."""
        loras = self._loras[name]
        merge = None
        if loras:
            shapes = module_tensor_shapes(build_on_meta(lambda: WanModel(**self._dit_kwargs())))
            merge = lora_merge_transform(loras, shapes)
        if self.random_init:
            logging.info('Creating WanModel %s with random weights (seed %d)', name, seed)
            model = WanModel.from_random(seed=seed, device=device, dtype_rule=dtype_rule,
                                         before_load=before_load, place=place,
                                         transform=chain(merge, transform),
                                         **self._dit_kwargs())
            return model
        source = getattr(self.layout, f'{name}_model')
        logging.info('Creating WanModel %s from %s', name, source.describe())
        return WanModel.from_source(source, self._dit_kwargs(), device=device,
                                    dtype_rule=dtype_rule, transform=chain(merge, transform),
                                    place=place, before_load=before_load,
                                    fp8_dtype=self.param_dtype,
                                    fp8_keep=None if loras else fp8_keep)

    def _build_expert(self, subfolder, checkpoint_dir, seed, use_sp, dit_fsdp, shard_fn,
                      convert_model_dtype) -> torch.nn.Module:
        rule = dtype_rule(WanModel, self.expert_dtype_mode(), self.param_dtype)
        name = 'high_noise' if subfolder == self.config.high_noise_checkpoint else 'low_noise'
        # random weights are drawn where the weights are used (no host copy of a 57 GB
        # expert), a checkpoint is read on the CPU; the placement rules below then apply
        model = self.load_expert(name, seed, device=self.device if self.random_init else 'cpu',
                                 dtype_rule=rule)
        return self._configure_model(model, use_sp, dit_fsdp, shard_fn, convert_model_dtype)

    @property
    def half_precision(self) -> bool:
        """Whether the compute dtype is a half type (bf16 for every released config): the
        denoising loop then runs under its autocast, and attention runs in it."""
        return self.param_dtype in (torch.bfloat16, torch.float16)

    @property
    def attention_dtype(self) -> torch.dtype:
        """The dtype q/k/v are cast to for the attention kernel: the compute dtype, or fp32
        for an fp32 config (tests)."""
        return self.param_dtype if self.half_precision else torch.float32

    def _configure_model(self, model, use_sp, dit_fsdp, shard_fn, convert_model_dtype):
        model.eval().requires_grad_(False)
        model.set_options(ForwardOptions(attn_dtype=self.attention_dtype))
        if use_sp:
            from .distributed.sequence_parallel import apply_sequence_parallel
            apply_sequence_parallel(model, group=self.sp_group)
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=self.group)
        if dit_fsdp:
            # CPU autocast has no fp32 mode (see convert_model_dtype above): on the CPU the
            # FSDP compute params stay fp32 so that the fp32 islands keep working
            model = shard_fn(model, param_dtype=torch.float32) if self.device.type == 'cpu' \
                else shard_fn(model)
        else:
            self._place_expert(model)
        return model

    def _place_expert(self, model: torch.nn.Module) -> None:
        """Upstream's placement of a built expert: on the GPU unless init_on_cpu (then it
        waits on the CPU until its first step moves it)."""
        if not self.init_on_cpu:
            model.to(self.device)
        elif self.random_init:
            model.to('cpu')

    # ------------------------------------------------------------------ hooks
    def _begin_step(self, index: int, num_steps: int) -> None:
        """Called before denoising step `index` of `num_steps` (nothing here; the optimized
        pipeline switches its fp8 schedule)."""

    def _prepare_model_for_timestep(self, t, boundary, offload_model):
        """Pick the expert for `t` and, when offloading, swap experts between CPU and GPU."""
        if t.item() >= boundary:
            required, offload = 'high_noise_model', 'low_noise_model'
        else:
            required, offload = 'low_noise_model', 'high_noise_model'
        if offload_model or self.init_on_cpu:
            other = getattr(self, offload)
            if next(other.parameters()).device.type == 'cuda':
                other.to('cpu')
            model = getattr(self, required)
            if next(model.parameters()).device.type == 'cpu' and self.device.type == 'cuda':
                model.to(self.device)
        return getattr(self, required)

    def _encode_text(self, prompts: Sequence[str], offload_model: bool) -> List[torch.Tensor]:
        """T5 contexts for each prompt, one encoder call per prompt as the reference."""
        if not self.t5_cpu:
            self.text_encoder.model.to(self.device)
            out = [self.text_encoder([p], self.device)[0] for p in prompts]
            if offload_model:
                self.text_encoder.model.cpu()
        else:
            out = [self.text_encoder([p], torch.device('cpu'))[0].to(self.device)
                   for p in prompts]
        return out

    def _predict_noise(self, model, latents: torch.Tensor, t: torch.Tensor,
                       context: torch.Tensor, context_null: torch.Tensor, seq_len: int,
                       guide_scale: float) -> torch.Tensor:
        """Classifier-free guidance: conditional pass, then unconditional, combined in fp32."""
        if self.cfg_parallel:
            # the two passes on the two CFG ranks, one all_gather, same combination
            from .distributed.cfg_parallel import cfg_parallel_predict
            return cfg_parallel_predict(model, latents, t, context, context_null, seq_len,
                                        guide_scale, self.cfg_group)
        timestep = torch.stack([t])
        cond = model([latents], t=timestep, context=[context], seq_len=seq_len)[0]
        uncond = model([latents], t=timestep, context=[context_null], seq_len=seq_len)[0]
        return uncond + guide_scale * (cond - uncond)

    def _autocast(self):
        if not self.half_precision:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.param_dtype)

    @staticmethod
    def make_scheduler(sample_solver: str, sampling_steps: int, shift: float, device,
                       num_train_timesteps: int = 1000):
        """Scheduler and its timesteps, built as upstream does (docs/SOLVERS.md#sigma-schedule)."""
        if sample_solver == 'unipc':
            scheduler = FlowUniPCMultistepScheduler(num_train_timesteps=num_train_timesteps,
                                                    shift=1, use_dynamic_shifting=False)
            scheduler.set_timesteps(sampling_steps, device=device, shift=shift)
            timesteps = scheduler.timesteps
        elif sample_solver == 'dpm++':
            scheduler = FlowDPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps,
                                                        shift=1, use_dynamic_shifting=False)
            sigmas = get_sampling_sigmas(sampling_steps, shift)
            timesteps, _ = retrieve_timesteps(scheduler, device=device, sigmas=sigmas)
        elif sample_solver == 'euler':
            # this project's addition (few-step distilled LoRAs, wan/configs/presets.py):
            # float timesteps, see FlowEulerScheduler.set_timesteps
            scheduler = FlowEulerScheduler(num_train_timesteps=num_train_timesteps, shift=1)
            scheduler.set_timesteps(sampling_steps, device=device, shift=shift)
            timesteps = scheduler.timesteps
        else:
            raise NotImplementedError(f'unsupported solver {sample_solver!r} (choose from '
                                      f'{", ".join(SOLVERS)})')
        return scheduler, timesteps

    # ------------------------------------------------------------------ generate
    def target_shape(self, size: Tuple[int, int], frame_num: int) -> Tuple[int, int, int, int]:
        """Latent shape (C, T', H', W') for `size` = (W, H)."""
        return (self.vae.model.z_dim, (frame_num - 1) // self.vae_stride[0] + 1,
                size[1] // self.vae_stride[1], size[0] // self.vae_stride[2])

    def seq_len_for(self, target_shape) -> int:
        """Token count of a latent, rounded up to a multiple of the SP size (docs/PIPELINE.md#sequence-length)."""
        return math.ceil((target_shape[2] * target_shape[3]) /
                         (self.patch_size[1] * self.patch_size[2]) *
                         target_shape[1] / self.sp_size) * self.sp_size

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
                 offload_model: bool = True) -> Optional[torch.Tensor]:
        """Generate a video; returns (3, F, H, W) in [-1, 1] on rank 0, None elsewhere.

        `guide_scale` is one float for both experts or a (low-noise, high-noise) tuple.
        Bad arguments raise ValueError before any work (wan/utils/validation.py).
        """
        check_generation_args(
            size=size, frame_num=frame_num, shift=shift, sample_solver=sample_solver,
            sampling_steps=sampling_steps, seed=seed, num_train_timesteps=self.num_train_timesteps,
            size_multiple=(self.vae_stride[2] * self.patch_size[2],
                           self.vae_stride[1] * self.patch_size[1]))
        if isinstance(guide_scale, (int, float)):
            guide_scale = (float(guide_scale), float(guide_scale))
        target_shape = self.target_shape(size, frame_num)
        seq_len = self.seq_len_for(target_shape)
        if n_prompt == '':
            n_prompt = self.sample_neg_prompt
        # every rank must draw the same noise: a negative seed draws one (rank 0's), and
        # ValueError on every rank if the ranks were given different seeds
        seed = agree_on_seed(seed, self.group)
        seed_g = torch.Generator(device=self.device)
        seed_g.manual_seed(seed)

        with self.stage('text_encode'):
            context, context_null = self._encode_text([input_prompt, n_prompt], offload_model)
        if not self.half_precision:
            # no autocast region below (see _autocast): cast the bf16 T5 output to the compute
            # dtype here, as the reference's autocast(dtype=float32) does for text_embedding
            context, context_null = context.to(self.param_dtype), context_null.to(self.param_dtype)
        noise = torch.randn(*target_shape, dtype=torch.float32, device=self.device,
                            generator=seed_g)
        boundary = self.boundary * self.num_train_timesteps

        with self._autocast(), torch.no_grad(), self._no_sync():
            sample_scheduler, timesteps = self.make_scheduler(
                sample_solver, sampling_steps, shift, self.device, self.num_train_timesteps)
            latents = noise
            for index, t in enumerate(tqdm(timesteps, desc='denoising',
                                           disable=self.rank != 0)):
                self._begin_step(index, len(timesteps))
                expert = 'high' if t.item() >= boundary else 'low'
                with self.stage('expert_switch', expert=expert, t=t):
                    model = self._prepare_model_for_timestep(t, boundary, offload_model)
                scale = guide_scale[1] if expert == 'high' else guide_scale[0]
                with self.stage('step', expert=expert, t=t):
                    noise_pred = self._predict_noise(model, latents, t, context, context_null,
                                                     seq_len, scale)
                latents = sample_scheduler.step(noise_pred.unsqueeze(0), t,
                                                latents.unsqueeze(0), return_dict=False,
                                                generator=seed_g)[0].squeeze(0)
            x0 = latents
            if offload_model:
                self.low_noise_model.cpu()
                self.high_noise_model.cpu()
                if self.device.type == 'cuda':
                    torch.cuda.empty_cache()
            if self.rank == 0:
                with self.stage('decode', latent=x0):
                    videos = self.decode(x0)
            else:
                videos = None

        del noise, latents, sample_scheduler
        if offload_model:
            gc.collect()
            if self.device.type == 'cuda':
                torch.cuda.synchronize()
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=self.group)
        return videos

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent (16, T', H', W') -> video (3, F, H, W) in [-1, 1]."""
        with self.stage('vae_decode'):
            return self.vae.decode([x0])[0]

    @contextmanager
    def _no_sync(self):
        """FSDP-wrapped experts skip gradient sync contexts; nothing to do otherwise."""
        managers = [getattr(m, 'no_sync', None) for m in (self.low_noise_model,
                                                          self.high_noise_model)]
        managers = [m() for m in managers if m is not None]
        for m in managers:
            m.__enter__()
        try:
            yield
        finally:
            for m in reversed(managers):
                m.__exit__(None, None, None)
