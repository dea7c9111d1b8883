"""The optimized pipeline's toggles and the ordered passes that apply them.

`OptimizationConfig` is frozen: one configuration per pipeline. Each field is one toggle,
with its help text and command-line spelling as field metadata, so that a new toggle is added
here and nowhere else: `generate_optimized.py` builds its flags with `add_cli_arguments`, the
benchmark and its ablations iterate `toggle_names()`.

A pipeline is optimized by `apply_passes(pipe, config)`, once, right after its models are
built (or adopted from a plain WanT2V by `optimize_pipeline`). The passes run in this order,
each one-shot (none undoes another):

1. module swaps      -- replace modules by faster equivalents (fp8 block linears with
                        --quantize: lossy, opt-in);
2. weight dtype      -- the dtype policy (wan/utils/dtype_policy.py): matmul weights in bf16;
3. attention kernels -- the kernel resolved once per model (wan/modules/attention.py), the
                        exact-math forward options (per-sample time embedding, fp32 RoPE,
                        FFN token chunks);
4. compile           -- torch.compile of each transformer block.

A fresh WanT2VOptimized loads its experts with the same dtype policy (so pass 2 finds nothing
left to convert). Process-wide switches (TF32, cuDNN autotuning) are never set by a pass:
`backend_flags` scopes them to one generate() call and restores them afterwards.
"""
from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Iterator, List, Tuple

import torch
import torch.nn as nn

from .modules.attention import ATTENTION_CHOICES, resolve_backend
from .modules.model import ForwardOptions
from .utils.dtype_policy import apply_dtype_policy_

if TYPE_CHECKING:  # pragma: no cover
    from .text2video import WanT2V

__all__ = ['OptimizationConfig', 'COMPILE_MODES', 'PASSES', 'apply_passes', 'backend_flags',
           'toggle_names', 'add_cli_arguments', 'config_from_args', 'weight_dtype_mode',
           'is_fsdp', 'compile_blocks']

COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def _toggle(default, help: str, flags: Tuple[str, ...] = (), off_flags: Tuple[str, ...] = (),
            choices: Tuple[str, ...] = ()):
    """A config field with its CLI spelling: `flags` switch it on (store_true; a non-bool
    field takes a value), `off_flags` switch it off; a bool with neither is `--name BOOL`."""
    return field(default=default, metadata={'help': help, 'flags': flags,
                                            'off_flags': off_flags, 'choices': choices})


@dataclass(frozen=True)
class OptimizationConfig:
    # exact, but measured no faster than two batch-1 passes on an H100 at 480p and 720p and
    # ~6 GiB more memory (bench/results): off by default, on by request
    batched_cfg: bool = _toggle(
        False, 'Conditional and unconditional passes in one batch-2 forward (exact; off by '
        'default: measured no faster on H100, more memory).',
        flags=('--use_batched_cfg',), off_flags=('--no-batched_cfg', '--no-use_batched_cfg'))
    per_sample_time: bool = _toggle(
        True, 'Time MLP and 6*dim projection once per sample instead of once per token '
        '(exact; default True).')
    fast_rope: bool = _toggle(
        True, 'RoPE from a cached fp32 cos/sin table instead of float64 products (exact to '
        'fp32; default True).')
    attention: str = _toggle(
        'auto', 'Attention kernel (auto: fastest available; reference: what upstream Wan2.2 '
        'would use here).', flags=('--attention',), choices=ATTENTION_CHOICES)
    bf16_weights: bool = _toggle(
        True, 'Store the matmul weights in the compute dtype (they are cast to it on every '
        'call anyway); the fp32 islands keep their dtype (exact; default True).')
    compile: bool = _toggle(
        True, 'torch.compile each transformer block (CUDA; default on).',
        flags=('--compile',), off_flags=('--no-compile',))
    compile_mode: str = _toggle(
        'default', 'torch.compile mode.', flags=('--compile_mode',), choices=COMPILE_MODES)
    # measured on the H200 (bench/results/h200_forward_check_a05f712.log): 8192-token chunks
    # left the activation peak unchanged (the peak is in self-attention) and cost ~1-2% per
    # forward, so the default is off
    ffn_chunk_tokens: int = _toggle(
        0, 'Run each FFN over at most this many tokens at a time (0: all at once, the '
        'default): the same per-token math, a fraction of its hidden activations.')
    prompt_cache: bool = _toggle(
        True, 'Encode each prompt once per pipeline (default True).')
    cfg_skip: bool = _toggle(
        True, 'An expert whose guide scale is 1.0 runs only the conditional pass (upstream '
        'computes uncond + 1.0 * (cond - uncond): cond up to fp32 rounding; default True).')
    vae_cudnn_benchmark: bool = _toggle(
        True, 'cuDNN autotuning for the VAE decode convolutions (same math; CUDA; default '
        'True).')
    vae_channels_last: bool = _toggle(
        True, 'VAE convolutions in channels-last layout (same math; CUDA only, where it is '
        'faster; default True).')
    tf32: bool = _toggle(
        False, 'TF32 for the remaining fp32 matmuls (changes the fp32 islands\' precision; '
        'opt-in).', flags=('--tf32',), off_flags=('--no-tf32',))
    quantize: str = _toggle(
        'none', 'LOSSY, opt-in: fp8 (e4m3) block linears with per-channel weight and '
        'per-token activation scales (torch._scaled_mm): a comma list of ffn, attn_proj, '
        'cross_attn, all (fp8 = all; none = off, the default). Pair with --attention fa3_fp8 '
        'for fp8 self-attention.', flags=('--quantize',))
    fp8_first_bf16_steps: int = _toggle(
        0, 'With --quantize or --attention fa3_fp8: run the first N denoising steps in bf16 '
        '(bf16 activations and exact attention; the fp8-stored weights dequantized to bf16). '
        'Default 0.')
    fp8_last_bf16_steps: int = _toggle(
        0, 'The same for the last N denoising steps. Default 0.')

    def __post_init__(self):
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f'compile_mode must be one of {COMPILE_MODES}, got '
                             f'{self.compile_mode!r}')
        if self.ffn_chunk_tokens < 0:
            raise ValueError(f'ffn_chunk_tokens must be >= 0 (0: no chunking), got '
                             f'{self.ffn_chunk_tokens}')
        quantize_parts(self.quantize)  # ValueError naming the valid parts
        if self.fp8_first_bf16_steps < 0 or self.fp8_last_bf16_steps < 0:
            raise ValueError(f'--fp8_first_bf16_steps / --fp8_last_bf16_steps must be >= 0, '
                             f'got {self.fp8_first_bf16_steps} / {self.fp8_last_bf16_steps}')
        if (self.fp8_first_bf16_steps or self.fp8_last_bf16_steps) and not (
                quantize_parts(self.quantize) or self.attention == 'fa3_fp8'):
            raise ValueError('--fp8_first_bf16_steps / --fp8_last_bf16_steps keep steps of an '
                             'fp8 run in bf16: they need --quantize or --attention fa3_fp8')
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f'attention must be one of {ATTENTION_CHOICES}, got '
                             f'{self.attention!r}')

    @classmethod
    def conservative(cls) -> 'OptimizationConfig':
        """Every toggle off: the reference computation inside the optimized class."""
        return cls(**{name: False for name in toggle_names()}, attention='reference',
                   ffn_chunk_tokens=0)

    def as_dict(self) -> dict:
        return asdict(self)


def toggle_names() -> List[str]:
    """The on/off toggles (bool fields), in declaration order."""
    return [f.name for f in fields(OptimizationConfig) if f.type in ('bool', bool)]


def add_cli_arguments(parser: argparse.ArgumentParser, title: str = 'optimizations') -> None:
    """One flag (or flag pair) per OptimizationConfig field, spelled by its metadata."""
    from .utils.utils import str2bool
    group = parser.add_argument_group(title)
    default = OptimizationConfig()
    for f in fields(OptimizationConfig):
        meta, value = f.metadata, getattr(default, f.name)
        if f.type in ('bool', bool) and meta['flags']:
            group.add_argument(*meta['flags'], dest=f.name, action='store_true', default=value,
                               help=meta['help'])
            if meta['off_flags']:
                group.add_argument(*meta['off_flags'], dest=f.name, action='store_false',
                                   help=f'Turn off: {f.name}.')
        elif f.type in ('bool', bool):
            group.add_argument(f'--{f.name}', dest=f.name, type=str2bool, default=value,
                               metavar='BOOL', help=meta['help'])
        else:
            group.add_argument(*(meta['flags'] or (f'--{f.name}',)), dest=f.name,
                               default=value, type=type(value),
                               choices=meta['choices'] or None, help=meta['help'])


def config_from_args(args: argparse.Namespace) -> OptimizationConfig:
    return OptimizationConfig(**{f.name: getattr(args, f.name)
                                 for f in fields(OptimizationConfig)})


# ----------------------------------------------------------------------------- passes
def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel
    return isinstance(module, FullyShardedDataParallel)


def weight_dtype_mode(config: OptimizationConfig, half_precision: bool,
                      convert_model_dtype: bool) -> str:
    """The dtype policy of the experts (wan/utils/dtype_policy.py): `--convert_model_dtype`
    stores everything in the compute dtype, as upstream; else bf16_weights stores the matmul
    weights in it and keeps the fp32 islands."""
    if convert_model_dtype:
        return 'all'
    return 'matmul' if config.bf16_weights and half_precision else 'checkpoint'


def quantize_parts(quantize: str) -> Tuple[str, ...]:
    """The block linear groups --quantize names ('none': none; 'fp8': all of them)."""
    names = [p.strip() for p in quantize.split(',') if p.strip()]
    if names in ([], ['none']):
        return ()
    from .modules.fp8 import expand_parts
    return expand_parts(['all' if n == 'fp8' else n for n in names])


def pass_module_swaps(pipe: 'WanT2V', config: OptimizationConfig) -> None:
    """Module replacements: the block linears --quantize names become fp8 linears (lossy,
    opt-in; wan/modules/fp8.py), quantized per output channel from the loaded weights. A
    fresh WanT2VOptimized quantizes them while loading (so this pass finds nothing left);
    an adopted pipeline's resident experts are swapped here."""
    parts = quantize_parts(config.quantize)
    if not parts:
        return
    from .modules.fp8 import linears_to_swap, swap_linears_
    for name, model in zip(('low_noise', 'high_noise'), pipe.experts()):
        if is_fsdp(model):
            raise ValueError('--quantize is not supported with FSDP-sharded experts '
                             '(--dit_fsdp)')
        if not linears_to_swap(model, parts):
            continue
        if name in getattr(pipe, '_streaming', {}):
            raise ValueError(f'--quantize: the {name} expert already streams its bf16 blocks '
                             'from host memory; build the pipeline with --quantize (the '
                             'weights are then quantized while they load) or drop it')
        count = swap_linears_(model, parts)
        logging.info('%s expert: %d block linears in fp8 (%s)', name, count, ', '.join(parts))


def pass_weight_dtype(pipe: 'WanT2V', config: OptimizationConfig) -> None:
    mode = weight_dtype_mode(config, pipe.half_precision, pipe.convert_model_dtype)
    for model in pipe.experts():
        if not is_fsdp(model):
            changed = apply_dtype_policy_(model, mode, pipe.param_dtype)
            if changed:
                logging.info('weight dtype (%s): %d tensors converted', mode, changed)


def pass_attention(pipe: 'WanT2V', config: OptimizationConfig) -> None:
    pipe.attention_backend = resolve_backend(config.attention, pipe.device)
    options = ForwardOptions(
        attn_backend=pipe.attention_backend,
        attn_dtype=pipe.attention_dtype,
        per_sample_time=config.per_sample_time, fast_rope=config.fast_rope,
        ffn_chunk_tokens=config.ffn_chunk_tokens)
    for model in pipe.experts():
        model.set_options(options)
    if config.attention == 'fa3_fp8':
        # cross-attention (512 text keys) stays bf16: fp8 only where it was measured to pay
        for model in pipe.experts():
            model.options.cross_attn_backend = 'fa3'


def pass_compile(pipe: 'WanT2V', config: OptimizationConfig) -> None:
    pipe.compiled = False
    if not config.compile:
        return
    if pipe.device.type != 'cuda':
        logging.info('compile: skipped (no CUDA device)')
        return
    if any(is_fsdp(m) for m in pipe.experts()):
        # FSDP units (flat parameters, use_orig_params=False as upstream): dynamo does not
        # trace through their parameter gathers
        logging.info('compile: skipped (the experts are FSDP-sharded, --dit_fsdp)')
        return
    for model in pipe.experts():
        compile_blocks(model, config.compile_mode)
    pipe.compiled = True


def compile_blocks(model: nn.Module, mode: str = 'default') -> None:
    """torch.compile each transformer block of `model` in place (nn.Module.compile).
    Identical blocks share one graph (parameters are graph inputs), so compile time is one
    block's."""
    for block in model.blocks:
        block.compile(mode=mode, dynamic=False)


PASSES: Tuple[Tuple[str, Callable[['WanT2V', OptimizationConfig], None]], ...] = (
    ('module swaps', pass_module_swaps),
    ('weight dtype', pass_weight_dtype),
    ('attention kernels', pass_attention),
    ('compile', pass_compile),
)


def apply_passes(pipe: 'WanT2V', config: OptimizationConfig) -> None:
    """Run every pass once, in order, on a freshly built (or adopted) pipeline."""
    if getattr(pipe, '_passes_applied', False):
        raise ValueError('this pipeline is already optimized (passes run once per pipeline)')
    for _, run in PASSES:
        run(pipe, config)
    pipe._passes_applied = True


@contextmanager
def backend_flags(config: OptimizationConfig, device: torch.device) -> Iterator[None]:
    """TF32 for fp32 matmuls and cuDNN autotuning for the duration of one call, restored
    afterwards (they are process-wide switches of torch)."""
    if device.type != 'cuda':
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    torch.backends.cudnn.benchmark = config.vae_cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved
