"""Checkpoint layouts: where each component's weights are, and how their names become ours.

Wan2.2 T2V-A14B is distributed in three layouts:

- the original release: `high_noise_model/` and `low_noise_model/` (config.json + safetensors,
  this project's names), `models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth` and the tokenizer
  folder `google/umt5-xxl/`;
- Diffusers (`Wan-AI/Wan2.2-T2V-A14B-Diffusers`): `transformer/` and `transformer_2/`
  (`WanTransformer3DModel`), `text_encoder/` (transformers' `UMT5EncoderModel`), `tokenizer/`,
  `vae/` (`AutoencoderKLWan`), `scheduler/` and `model_index.json`. diffusers' `WanPipeline` runs
  `transformer` for timesteps t >= boundary_ratio * num_train_timesteps and `transformer_2`
  below it, so `transformer/` is the high-noise expert and `transformer_2/` the low-noise one;
- ComfyUI's repackaged single files: `wan2.2_t2v_{high,low}_noise_14B_{fp16,fp8_scaled}.safetensors`
  (this project's DiT names, sometimes prefixed `model.diffusion_model.`), `umt5_xxl_*.safetensors`
  (transformers' T5 names) and `wan_2.1_vae.safetensors` (this project's VAE names). ComfyUI ships
  no tokenizer folder.

`detect_layout` looks at the files present component by component, so one folder may mix
layouts (ComfyUI experts next to the original T5, VAE and tokenizer, say); the experts may also
be given as explicit files. Each component comes back as a `ComponentSource`: the files to read
and the `rename` / `transform` hooks of `wan.utils.checkpoint.load_tensors_` that turn the
file's tensors into this project's (renamed, scaled fp8 dequantized). Missing components raise
one `CheckpointError` that lists what was found and what was looked for.

Scaled fp8 (ComfyUI `*_fp8_scaled`): `<layer>.weight` is stored in a float8 dtype next to a
float32 scale, `<layer>.scale_weight` (older files, with a `scaled_fp8` marker tensor) or
`<layer>.weight_scale` (newer files, with a per-layer `<layer>.comfy_quant` JSON blob); the
weight is `weight * scale`. `fp8_transform` computes that product in float32 and rounds it once
to bf16 (or a requested dtype), or keeps the fp8 weight and its scale for an fp8 compute path.
NVFP4 files (4-bit values packed in uint8, `.weight_scale_2`) are refused: they need Blackwell
GPUs.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import (Any, Callable, Collection, Dict, FrozenSet, Iterable, Iterator, List,
                    Mapping, Optional, Sequence, Tuple, Union)

import torch

from .checkpoint import CheckpointError, iter_pth, iter_safetensors

__all__ = [
    'Rename', 'Transform', 'NameMap', 'Renamer', 'DIT_DIFFUSERS_NAMES', 'T5_HF_NAMES',
    'VAE_DIFFUSERS_NAMES', 'COMPONENTS', 'ComponentSource', 'CheckpointLayout', 'detect_layout',
    'fp8_transform', 'drop_repeated', 'chain_transforms', 'wan_kwargs_from_diffusers_config',
    'SCALE_SUFFIXES',
]

logger = logging.getLogger(__name__)

Rename = Callable[[str], Optional[str]]
Transform = Callable[[Iterator[Tuple[str, torch.Tensor]]], Iterator[Tuple[str, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# Name maps
# ---------------------------------------------------------------------------------------------

class _PrefixTable:
    """Module-path renames from (source, target) templates; '{n}' matches a block number."""

    def __init__(self, pairs: Iterable[Tuple[str, str]]) -> None:
        self.exact: Dict[str, str] = {}
        self.patterns: List[Tuple[re.Pattern, str]] = []
        for src, dst in pairs:
            if '{n}' in src:
                if src.count('{n}') != 1 or dst.count('{n}') != 1:
                    raise ValueError(f'name template {src!r} -> {dst!r}: one {{n}} on each side')
                regex = re.compile(re.escape(src).replace(re.escape('{n}'), r'(\d+)'))
                self.patterns.append((regex, dst))
            else:
                self.exact.setdefault(src, dst)

    def _lookup(self, prefix: str) -> Optional[str]:
        if prefix in self.exact:
            return self.exact[prefix]
        for regex, dst in self.patterns:
            m = regex.fullmatch(prefix)
            if m:
                return dst.replace('{n}', m.group(1))
        return None

    def __call__(self, name: str) -> str:
        parts = name.split('.')
        for k in range(len(parts), 0, -1):
            hit = self._lookup('.'.join(parts[:k]))
            if hit is not None:
                return '.'.join([hit] + parts[k:])
        return name


class NameMap:
    """Renames between another library's tensor names ('theirs') and this project's ('ours').

    Built from (theirs, ours) module-path templates, where '{n}' stands for a block number. A
    name is renamed by its longest module-path prefix that has a template; the rest of the name
    (child modules, the parameter leaf such as `weight` or `scale_weight`) is kept, and a name
    no template covers is returned unchanged (so that the loader reports it as unexpected).
    `aliases` are further spellings that are only read (theirs -> ours), never written.
    """

    def __init__(self, pairs: Sequence[Tuple[str, str]],
                 aliases: Sequence[Tuple[str, str]] = ()) -> None:
        self.pairs = tuple(pairs)
        self._to_ours = _PrefixTable(list(pairs) + list(aliases))
        self._to_theirs = _PrefixTable([(ours, theirs) for theirs, ours in pairs])

    def to_ours(self, name: str) -> str:
        return self._to_ours(name)

    def to_theirs(self, name: str) -> str:
        return self._to_theirs(name)


def _attention_pairs(theirs: str, ours: str) -> List[Tuple[str, str]]:
    pairs = [(f'blocks.{{n}}.{theirs}', f'blocks.{{n}}.{ours}')]  # norm_q / norm_k keep names
    for t, o in (('to_q', 'q'), ('to_k', 'k'), ('to_v', 'v'), ('to_out.0', 'o')):
        pairs.append((f'blocks.{{n}}.{theirs}.{t}', f'blocks.{{n}}.{ours}.{o}'))
    return pairs


# diffusers' WanTransformer3DModel -> WanModel. Same shapes throughout: the modulation tables
# are (1, 6, dim) per block and (1, 2, dim) in the head in both. The block norms differ only in
# their numbering: diffusers' norm2 is the affine cross-attention norm (our norm3) and its
# norm3 the parameter-free FFN norm (our norm2), so only norm2 -> norm3 carries tensors.
DIT_DIFFUSERS_NAMES = NameMap([
    ('condition_embedder.text_embedder.linear_1', 'text_embedding.0'),
    ('condition_embedder.text_embedder.linear_2', 'text_embedding.2'),
    ('condition_embedder.time_embedder.linear_1', 'time_embedding.0'),
    ('condition_embedder.time_embedder.linear_2', 'time_embedding.2'),
    ('condition_embedder.time_proj', 'time_projection.1'),
    ('proj_out', 'head.head'),
    ('scale_shift_table', 'head.modulation'),
    ('blocks.{n}.scale_shift_table', 'blocks.{n}.modulation'),
    *_attention_pairs('attn1', 'self_attn'),
    *_attention_pairs('attn2', 'cross_attn'),
    ('blocks.{n}.norm2', 'blocks.{n}.norm3'),
    ('blocks.{n}.ffn.net.0.proj', 'blocks.{n}.ffn.0'),
    ('blocks.{n}.ffn.net.2', 'blocks.{n}.ffn.2'),
])

# transformers' UMT5EncoderModel (also ComfyUI's umt5 files) -> T5Encoder. umT5 gives every
# block its own relative-attention-bias table (T5 puts one in block 0 only), which is this
# project's per-block `pos_embedding`. The gated FFN computes gelu(wi_0 x) * wi_1 x, so wi_0
# is the gate. `shared` and `encoder.embed_tokens` are the same tied embedding; files hold
# either or both (`chain_transforms(..., drop_repeated)` keeps the first).
T5_HF_NAMES = NameMap([
    ('shared', 'token_embedding'),
    ('encoder.block.{n}.layer.0.layer_norm', 'blocks.{n}.norm1'),
    ('encoder.block.{n}.layer.0.SelfAttention', 'blocks.{n}.attn'),
    ('encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias',
     'blocks.{n}.pos_embedding.embedding'),
    ('encoder.block.{n}.layer.1.layer_norm', 'blocks.{n}.norm2'),
    ('encoder.block.{n}.layer.1.DenseReluDense.wi_0', 'blocks.{n}.ffn.gate.0'),
    ('encoder.block.{n}.layer.1.DenseReluDense.wi_1', 'blocks.{n}.ffn.fc1'),
    ('encoder.block.{n}.layer.1.DenseReluDense.wo', 'blocks.{n}.ffn.fc2'),
    ('encoder.final_layer_norm', 'norm'),
], aliases=[('encoder.embed_tokens', 'token_embedding')])


def _resnet_pairs(theirs: str, ours: str) -> List[Tuple[str, str]]:
    # ResidualBlock.residual = (norm, SiLU, conv, norm, SiLU, Dropout, conv)
    return [(f'{theirs}.norm1', f'{ours}.residual.0'), (f'{theirs}.conv1', f'{ours}.residual.2'),
            (f'{theirs}.norm2', f'{ours}.residual.3'), (f'{theirs}.conv2', f'{ours}.residual.6'),
            (f'{theirs}.conv_shortcut', f'{ours}.shortcut')]


def _vae_pairs() -> List[Tuple[str, str]]:
    """diffusers' AutoencoderKLWan -> the Wan2.1 VAE, for its fixed topology (4 levels,
    2 residual blocks per encoder level and 3 per decoder level)."""
    pairs = [('quant_conv', 'conv1'), ('post_quant_conv', 'conv2')]
    for side in ('encoder', 'decoder'):
        pairs += [(f'{side}.conv_in', f'{side}.conv1'), (f'{side}.norm_out', f'{side}.head.0'),
                  (f'{side}.conv_out', f'{side}.head.2'),
                  (f'{side}.mid_block.attentions.0', f'{side}.middle.1')]
        for i in (0, 1):
            pairs += _resnet_pairs(f'{side}.mid_block.resnets.{i}', f'{side}.middle.{2 * i}')
    # encoder: one flat list of residual blocks and resamples under both spellings
    pairs += [('encoder.down_blocks.{n}', 'encoder.downsamples.{n}')]
    pairs += _resnet_pairs('encoder.down_blocks.{n}', 'encoder.downsamples.{n}')
    # decoder: diffusers groups our flat list [3 resnets, resample] x 3 + [3 resnets] by level
    for level in range(4):
        for r in range(3):
            pairs += _resnet_pairs(f'decoder.up_blocks.{level}.resnets.{r}',
                                   f'decoder.upsamples.{4 * level + r}')
        if level < 3:
            pairs.append((f'decoder.up_blocks.{level}.upsamplers.0',
                          f'decoder.upsamples.{4 * level + 3}'))
    return pairs


VAE_DIFFUSERS_NAMES = NameMap(_vae_pairs())

_DIT_PREFIXES = ('model.diffusion_model.', 'diffusion_model.')
# tensors some files carry that are no weights of ours: ComfyUI's scaled-fp8 marker, the
# tokenizer model embedded in some ComfyUI T5 files, and diffusers' `norm_added_q`, which
# diffusers itself ignores on load (an image-conditioning leftover)
_DROP = re.compile(r'(scaled_fp8|spiece_model|.*\.norm_added_q\..*)')


@dataclass(frozen=True)
class Renamer:
    """The `rename` hook for one file: strip a key prefix, drop marker tensors, map names."""

    prefix: str = ''
    names: Optional[NameMap] = None

    def __call__(self, name: str) -> Optional[str]:
        if self.prefix and name.startswith(self.prefix):
            name = name[len(self.prefix):]
        if _DROP.fullmatch(name):
            return None
        return self.names.to_ours(name) if self.names is not None else name


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

SCALE_SUFFIXES = ('.scale_weight', '.weight_scale')    # float32 weight scales (old, new)
_INPUT_SCALE_SUFFIXES = ('.scale_input', '.input_scale')  # activation scales: not needed
_QUANT_CONFIG_SUFFIX = '.comfy_quant'                    # per-layer JSON, checked on detection
_FP8_DTYPES = tuple(getattr(torch, n) for n in ('float8_e4m3fn', 'float8_e5m2', 'float8_e4m3fnuz',
                                                'float8_e5m2fnuz') if hasattr(torch, n))


def _scale_for(weight: torch.Tensor, scale: torch.Tensor, layer: str) -> torch.Tensor:
    """The fp32 scale shaped to broadcast over `weight`: one per tensor or one per row."""
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:
        return scale.reshape(-1, *([1] * (weight.dim() - 1)))
    raise CheckpointError(f'{layer}: weight scale of shape {tuple(scale.shape)} does not fit '
                          f'the weight {tuple(weight.shape)} (one scale per tensor or per row)')


def fp8_transform(scaled_layers: Collection[str] = (), *, dtype: torch.dtype = torch.bfloat16,
                  keep_fp8: Union[bool, Collection[str]] = False) -> Transform:
    """Dequantize fp8 weights as they stream by: `<layer>.weight` (a float8 dtype) times its
    float32 scale (`<layer>.scale_weight` or `<layer>.weight_scale`), computed in float32 and
    rounded once to `dtype`. A float8 weight without a scale has scale 1 (plain fp8 files).

    `scaled_layers` lists the layers (names as the transform sees them, i.e. renamed) whose
    scale is in the file, so that only a weight waiting for its scale, or a scale waiting for
    its weight, is held back. Activation scales and `comfy_quant` blobs are dropped; other
    tensors pass through unchanged.

    keep_fp8: yield the float8 weight unchanged and its scale as `<layer>.weight_scale`
    (float32; a scale of 1 where the file has none), for an fp8 compute path. A collection
    of weight names (read when the stream starts, so it may be filled until then) keeps only
    those, and only e4m3 ones (what `Fp8Linear` computes with), each scale shaped (out, 1) as
    an Fp8Linear holds it; every other fp8 weight is dequantized.
    """
    scaled = frozenset(scaled_layers)
    keep_all = keep_fp8 is True

    def emit(layer: str, weight: torch.Tensor, scale: Optional[torch.Tensor],
             keep_names: FrozenSet[str]):
        if keep_all or (f'{layer}.weight' in keep_names and weight.dtype ==
                        torch.float8_e4m3fn and weight.dim() == 2):
            scale = torch.ones((), dtype=torch.float32) if scale is None else \
                scale.to(torch.float32)
            yield f'{layer}.weight', weight
            yield f'{layer}.weight_scale', scale if keep_all else \
                _scale_for(weight, scale, layer).expand(weight.shape[0], 1).contiguous()
        elif scale is None:
            yield f'{layer}.weight', weight.to(dtype)  # exact: bf16/fp16/fp32 hold every e4m3
        else:
            yield f'{layer}.weight', (weight.to(torch.float32)
                                      * _scale_for(weight, scale, layer)).to(dtype)

    def transform(stream: Iterator[Tuple[str, torch.Tensor]]):
        keep = frozenset() if isinstance(keep_fp8, bool) else frozenset(keep_fp8)
        weights: Dict[str, torch.Tensor] = {}  # waiting for their scale
        scales: Dict[str, torch.Tensor] = {}   # waiting for their weight
        for name, tensor in stream:
            if name.endswith(_INPUT_SCALE_SUFFIXES) or name.endswith(_QUANT_CONFIG_SUFFIX):
                continue
            suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                layer = name[:-len(suffix)]
                if layer in weights:
                    yield from emit(layer, weights.pop(layer), tensor, keep)
                else:
                    scales[layer] = tensor
                continue
            if name.endswith('.weight'):
                layer = name[:-len('.weight')]
                if layer in scaled:
                    if layer in scales:
                        yield from emit(layer, tensor, scales.pop(layer), keep)
                    else:
                        weights[layer] = tensor
                    continue
                if tensor.dtype in _FP8_DTYPES:
                    yield from emit(layer, tensor, None, keep)
                    continue
            yield name, tensor
        left = sorted(weights) + sorted(scales)
        if left:
            raise CheckpointError(f'{len(left)} fp8 layer(s) without their weight or scale: '
                                  + ', '.join(left[:5]) + (', ...' if len(left) > 5 else ''))

    return transform


def drop_repeated(stream: Iterator[Tuple[str, torch.Tensor]]):
    """Keep the first tensor of each name (a tied weight stored under two names)."""
    seen = set()
    for name, tensor in stream:
        if name not in seen:
            seen.add(name)
            yield name, tensor


def chain_transforms(*transforms: Optional[Transform]) -> Optional[Transform]:
    """One transform applying `transforms` left to right (None entries are skipped)."""
    steps = [t for t in transforms if t is not None]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def chained(stream):
        for step in steps:
            stream = step(stream)
        return stream
    return chained


# ---------------------------------------------------------------------------------------------
# File inspection
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Header:
    """Names, dtypes (safetensors spelling, e.g. 'BF16', 'F8_E4M3', 'U8') and metadata."""

    names: Tuple[str, ...]
    dtypes: Mapping[str, str]
    metadata: Mapping[str, str]
    quant_formats: Mapping[str, str]  # layer (stored name) -> comfy_quant "format"


def _read_header(paths: Sequence[str]) -> _Header:
    from safetensors import safe_open
    names, dtypes, metadata, formats = [], {}, {}, {}
    for path in paths:
        try:
            with safe_open(path, framework='pt', device='cpu') as f:
                metadata.update(f.metadata() or {})
                for name in f.keys():
                    names.append(name)
                    dtypes[name] = f.get_slice(name).get_dtype()
                    if name.endswith(_QUANT_CONFIG_SUFFIX):
                        blob = f.get_tensor(name)
                        try:
                            conf = json.loads(bytes(blob.to(torch.uint8).tolist()).decode())
                        except Exception as exc:
                            raise CheckpointError(f'{path}: unreadable quantization config '
                                                  f'{name}: {exc}') from exc
                        formats[name[:-len(_QUANT_CONFIG_SUFFIX)]] = str(conf.get('format'))
        except (FileNotFoundError, CheckpointError):
            raise
        except Exception as exc:
            raise CheckpointError(f'cannot read safetensors file {path}: {exc}') from exc
    layers = metadata.get('_quantization_metadata')
    if layers:
        try:
            for layer, conf in json.loads(layers).get('layers', {}).items():
                formats.setdefault(layer, str(conf.get('format')))
        except Exception as exc:
            raise CheckpointError(f'{paths[0]}: unreadable _quantization_metadata: {exc}') from exc
    return _Header(tuple(names), dtypes, metadata, formats)


def _check_quantization(header: _Header, where: str) -> Optional[str]:
    """None, 'fp8' or 'scaled_fp8'; refuses NVFP4 and other packed formats."""
    formats = set(header.quant_formats.values())
    nvfp4 = ({'nvfp4', 'mxfp4'} & formats
             or any(n.endswith('.weight_scale_2') for n in header.names))
    if nvfp4:
        raise CheckpointError(
            f'{where} holds NVFP4 weights (4-bit values packed in uint8), which need an NVIDIA '
            f'Blackwell GPU and are not supported here; use the fp16 or fp8_scaled file instead')
    unknown = sorted(f for f in formats if not f.startswith('float8'))
    packed = [n for n in header.names if n.endswith('.weight') and header.dtypes[n] in ('U8', 'I8')]
    if unknown or packed:
        what = f'quantization format(s) {", ".join(unknown)}' if unknown else \
            f'{len(packed)} integer-packed weight(s) such as {packed[0]}'
        raise CheckpointError(f'{where} uses {what}, which this project cannot read; use the '
                              f'fp16 or fp8_scaled file instead')
    if any(n.endswith(SCALE_SUFFIXES) for n in header.names):
        return 'scaled_fp8'
    if any(d.startswith('F8') for d in header.dtypes.values()):
        return 'fp8'
    return None


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

COMPONENTS = ('high_noise_model', 'low_noise_model', 't5', 'tokenizer', 'vae')
_TITLES = {'high_noise_model': 'high-noise expert', 'low_noise_model': 'low-noise expert',
           't5': 'T5 text encoder', 'tokenizer': 'tokenizer', 'vae': 'VAE'}


@dataclass(frozen=True)
class ComponentSource:
    """Where one component's weights are and how to read them.

    `files` are streamed in order (`iter_tensors`), then each name goes through `rename`
    (None: names are already ours) and the stream through `transform(...)`; both are the hooks
    of `load_tensors_`. For the tokenizer, `path` is its folder and `files` is empty.
    """

    component: str
    layout: str  # 'original' | 'diffusers' | 'comfyui'
    path: str
    files: Tuple[str, ...] = ()
    rename: Optional[Rename] = None
    quantization: Optional[str] = None  # None | 'fp8' | 'scaled_fp8'
    scaled_layers: FrozenSet[str] = frozenset()  # renamed layers with a scale in the file
    tied_names: bool = False  # a tied tensor may appear under two names (HF T5)
    config_path: Optional[str] = None  # config.json next to the weights, if any

    def transform(self, dtype: torch.dtype = torch.bfloat16,
                  keep_fp8: Union[bool, Collection[str]] = False) -> Optional[Transform]:
        """The `transform` hook: fp8 dequantization to `dtype` (or keep_fp8, see
        `fp8_transform`) when the file is fp8, and de-duplication of tied names; None if the
        stream needs no change."""
        quant = (fp8_transform(self.scaled_layers, dtype=dtype, keep_fp8=keep_fp8)
                 if self.quantization else None)
        return chain_transforms(drop_repeated if self.tied_names else None, quant)

    def iter_tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """The files' tensors under their stored names, one at a time."""
        if not self.files:
            raise CheckpointError(f'{self.describe()} has no weight files')
        if self.files[0].endswith('.pth'):
            for path in self.files:
                yield from iter_pth(path)
        else:
            yield from iter_safetensors(self.files)

    def describe(self) -> str:
        quant = f', {self.quantization}' if self.quantization else ''
        return f'{_TITLES[self.component]}: {self.layout} {self.path}{quant}'


@dataclass(frozen=True)
class CheckpointLayout:
    """Every component of a T2V-A14B checkpoint (see `detect_layout`)."""

    root: str
    high_noise_model: ComponentSource
    low_noise_model: ComponentSource
    t5: ComponentSource
    tokenizer: ComponentSource
    vae: ComponentSource
    # what a Diffusers folder's model_index.json and scheduler config say; informational:
    # the shipped scheduler config says shift 3.0 where T2V-A14B samples at 12.0, so the
    # pipeline keeps its task config's shift, boundary and guidance and says so in its log
    boundary_ratio: Optional[float] = None
    scheduler_shift: Optional[float] = None

    def sources(self) -> List[ComponentSource]:
        return [getattr(self, c) for c in COMPONENTS]

    @property
    def kind(self) -> str:
        """'original', 'diffusers', 'comfyui', or 'mixed' when components differ."""
        kinds = {s.layout for s in self.sources() if s.component != 'tokenizer'}
        return kinds.pop() if len(kinds) == 1 else 'mixed'

    def describe(self) -> str:
        return '; '.join(s.describe() for s in self.sources())


def wan_kwargs_from_diffusers_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """WanModel keyword arguments from a diffusers `WanTransformer3DModel` config.json."""
    try:
        heads = int(cfg['num_attention_heads'])
        kwargs = dict(dim=heads * int(cfg['attention_head_dim']), num_heads=heads,
                      ffn_dim=int(cfg['ffn_dim']), freq_dim=int(cfg['freq_dim']),
                      text_dim=int(cfg['text_dim']), in_dim=int(cfg['in_channels']),
                      out_dim=int(cfg['out_channels']), num_layers=int(cfg['num_layers']),
                      patch_size=tuple(cfg['patch_size']), eps=float(cfg['eps']),
                      cross_attn_norm=bool(cfg['cross_attn_norm']),
                      qk_norm=cfg.get('qk_norm') is not None)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f'not a WanTransformer3DModel config: {exc!r}') from exc
    if cfg.get('image_dim') is not None or cfg.get('added_kv_proj_dim') is not None:
        raise CheckpointError('this WanTransformer3DModel has image conditioning (i2v); this '
                              'project implements text-to-video only')
    return kwargs


def _sharded(folder: str, stem: str) -> Optional[Tuple[str, ...]]:
    """Shards of `folder/<stem>.safetensors[.index.json]`, or None if neither exists."""
    index = os.path.join(folder, f'{stem}.safetensors.index.json')
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
        except Exception as exc:
            raise CheckpointError(f'cannot read shard index {index}: {exc}') from exc
        paths = tuple(os.path.join(folder, s) for s in shards)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f'{len(missing)} shard(s) listed in {index} are missing, e.g. '
                                  f'{missing[0]}')
        return paths
    single = os.path.join(folder, f'{stem}.safetensors')
    return (single,) if os.path.isfile(single) else None


def _names_family(names: Sequence[str], component: str, where: str) -> Tuple[str, str]:
    """(prefix, 'ours' | 'diffusers' | 'hf') of a file's tensor names, from the names."""
    if any('.lora_' in n or n.startswith('lora_unet_') for n in names):
        raise CheckpointError(f'{where} is a LoRA, not a {_TITLES[component]} checkpoint: pass '
                              f'it with --lora / --lora_high / --lora_low')
    prefix = ''
    if component in ('high_noise_model', 'low_noise_model'):
        prefix = next((p for p in _DIT_PREFIXES if any(n.startswith(p) for n in names)), '')
    stripped = [n[len(prefix):] if n.startswith(prefix) else n for n in names]
    has = lambda pattern: any(re.match(pattern, n) for n in stripped)  # noqa: E731
    if component in ('high_noise_model', 'low_noise_model'):
        if has(r'blocks\.\d+\.self_attn\.'):
            return prefix, 'ours'
        if has(r'blocks\.\d+\.attn1\.'):
            return prefix, 'diffusers'
        what = 'a Wan DiT'
    elif component == 't5':
        if has(r'blocks\.\d+\.attn\.'):
            return prefix, 'ours'
        if has(r'encoder\.block\.\d+\.layer\.'):
            return prefix, 'hf'
        what = 'a umT5 encoder'
    else:
        if has(r'decoder\.upsamples\.'):
            return prefix, 'ours'
        if has(r'decoder\.up_blocks\.'):
            return prefix, 'diffusers'
        what = 'a Wan2.1 VAE'
    raise CheckpointError(f'{where} does not look like {what} checkpoint (first tensors: '
                          + ', '.join(names[:3]) + ')')


def _safetensors_source(component: str, layout: str, path: str, files: Tuple[str, ...],
                        config_path: Optional[str] = None) -> ComponentSource:
    header = _read_header(files)
    if not header.names:
        raise CheckpointError(f'{path} holds no tensors')
    prefix, family = _names_family(header.names, component, path)
    names = {'ours': None, 'diffusers': VAE_DIFFUSERS_NAMES if component == 'vae'
             else DIT_DIFFUSERS_NAMES, 'hf': T5_HF_NAMES}[family]
    rename = Renamer(prefix, names) if (prefix or names is not None) else None
    quant = _check_quantization(header, path)
    scaled = frozenset()
    if quant == 'scaled_fp8':
        for name in header.names:
            suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                renamed = rename(name) if rename is not None else name
                if renamed is not None:
                    scaled |= {renamed[:-len(suffix)]}
    return ComponentSource(component, layout, path, files, rename, quant, scaled,
                           tied_names=family == 'hf', config_path=config_path)


def _single_file(component: str, path: str, layout: str = 'comfyui') -> ComponentSource:
    if not path.endswith('.safetensors'):
        raise CheckpointError(f'{path}: expected a .safetensors file for the '
                              f'{_TITLES[component]}')
    return _safetensors_source(component, layout, path, (path,))


def _folder_source(component: str, layout: str, folder: str,
                   stem: str) -> Optional[ComponentSource]:
    if not os.path.isdir(folder):
        return None
    files = _sharded(folder, stem)
    if files is None:
        return None
    config = os.path.join(folder, 'config.json')
    return _safetensors_source(component, layout, folder, files,
                               config if os.path.isfile(config) else None)


def _glob_one(root: str, patterns: Sequence[str], exclude: Sequence[str], component: str,
              flag: Optional[str]) -> Optional[str]:
    """The one ComfyUI file in `root` matching `patterns` (case-insensitive), or None."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return None
    hits = [e for e in entries if e.lower().endswith('.safetensors')
            and any(fnmatch.fnmatch(e.lower(), p) for p in patterns)
            and not any(x in e.lower() for x in exclude)
            and os.path.isfile(os.path.join(root, e))]
    if len(hits) > 1:
        how = f'; pass the one to use with {flag}' if flag else '; keep only one in the folder'
        raise CheckpointError(f'{root} holds {len(hits)} candidate {_TITLES[component]} files '
                              f'({", ".join(hits)}){how}')
    return os.path.join(root, hits[0]) if hits else None


def _explicit_dit(component: str, path: str) -> ComponentSource:
    if os.path.isdir(path):
        source = _folder_source(component, 'original', path, 'diffusion_pytorch_model')
        if source is None:
            raise CheckpointError(f'no diffusion_pytorch_model.safetensors[.index.json] in '
                                  f'{os.path.abspath(path)}')
        return source if source.rename is None else replace(source, layout='diffusers')
    if not os.path.isfile(path):
        raise CheckpointError(f'{_TITLES[component]} file not found: looked for '
                              f'{os.path.abspath(path)}')
    return _single_file(component, path)


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as exc:
        raise CheckpointError(f'cannot read {path}: {exc}') from exc


def detect_layout(ckpt_dir: str, *, high_noise_file: Optional[str] = None,
                  low_noise_file: Optional[str] = None, config: Any = None) -> CheckpointLayout:
    """Find every T2V-A14B component in `ckpt_dir` (see the module docstring).

    Each component is looked for in this order, the first hit wins: the original release
    name, the Diffusers subfolder, a ComfyUI single file in `ckpt_dir` itself. The original
    names come from `config` (a task config: t5_checkpoint, vae_checkpoint, t5_tokenizer,
    high/low_noise_checkpoint), defaulting to t2v-A14B's. `high_noise_file` / `low_noise_file`
    (a .safetensors file or a DiT folder) replace the search for that expert. Only file headers
    are read. Raises CheckpointError naming what was found and what is missing.
    """
    if config is None:
        from ..configs.wan_t2v_A14B import t2v_A14B as config
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        raise CheckpointError(f'checkpoint directory not found: {ckpt_dir!r} (looked for '
                              f'{os.path.abspath(ckpt_dir or ".")})')
    root = ckpt_dir
    join = lambda *p: os.path.join(root, *p)  # noqa: E731
    found: Dict[str, ComponentSource] = {}
    looked: Dict[str, List[str]] = {}

    def search(component: str,
               candidates: Sequence[Tuple[str, Callable[[], Optional[ComponentSource]]]]):
        looked[component] = [label for label, _ in candidates]
        for _, find in candidates:
            source = find()
            if source is not None:
                found[component] = source
                return

    for component, explicit, sub, diffusers_sub, tag, flag in (
            ('high_noise_model', high_noise_file, config.high_noise_checkpoint, 'transformer',
             'high_noise', '--high_noise_file'),
            ('low_noise_model', low_noise_file, config.low_noise_checkpoint, 'transformer_2',
             'low_noise', '--low_noise_file')):
        if explicit is not None:
            found[component] = _explicit_dit(component, explicit)
            continue

        def comfy(tag=tag, component=component, flag=flag):
            path = _glob_one(root, [f'*{tag}*'], ('lora',), component, flag)
            return _single_file(component, path) if path else None
        search(component, [
            (f'{sub}/', lambda sub=sub, c=component: _folder_source(
                c, 'original', join(sub), 'diffusion_pytorch_model')),
            (f'{diffusers_sub}/', lambda s=diffusers_sub, c=component: _folder_source(
                c, 'diffusers', join(s), 'diffusion_pytorch_model')),
            (f'*{tag}*.safetensors', comfy)])

    def original_file(component: str, rel: str) -> Optional[ComponentSource]:
        path = join(rel)
        return ComponentSource(component, 'original', path, (path,)) \
            if os.path.isfile(path) else None

    def comfy_file(component: str, patterns: Sequence[str],
                   exclude: Sequence[str] = ()) -> Optional[ComponentSource]:
        path = _glob_one(root, patterns, ('lora',) + tuple(exclude), component, None)
        return _single_file(component, path) if path else None

    search('t5', [
        (config.t5_checkpoint, lambda: original_file('t5', config.t5_checkpoint)),
        ('text_encoder/', lambda: _folder_source('t5', 'diffusers', join('text_encoder'),
                                                 'model')),
        ('umt5*.safetensors', lambda: comfy_file('t5', ['umt5*']))])

    def tokenizer(rel: str, layout: str) -> Optional[ComponentSource]:
        path = join(rel)
        return ComponentSource('tokenizer', layout, path) if os.path.isdir(path) else None
    search('tokenizer', [(f'{config.t5_tokenizer}/', lambda: tokenizer(config.t5_tokenizer,
                                                                       'original')),
                         ('tokenizer/', lambda: tokenizer('tokenizer', 'diffusers'))])

    # the Wan2.2 VAE (wan2.2_vae.safetensors, for TI2V-5B) is a different model: not a candidate
    search('vae', [
        (config.vae_checkpoint, lambda: original_file('vae', config.vae_checkpoint)),
        ('vae/', lambda: _folder_source('vae', 'diffusers', join('vae'),
                                        'diffusion_pytorch_model')),
        ('*vae*.safetensors', lambda: comfy_file('vae', ['*vae*'], ('2.2', '2_2')))])

    missing = [c for c in COMPONENTS if c not in found]
    if missing:
        parts = [f'{_TITLES[c]} (looked for {", ".join(looked[c])})' for c in missing]
        have = '; found ' + ', '.join(found[c].describe() for c in COMPONENTS if c in found) \
            if found else '; found none of the components'
        raise CheckpointError(f'checkpoint {os.path.abspath(root)} is incomplete: missing '
                              + ', '.join(parts) + have)

    index = _read_json(join('model_index.json')) or {}
    scheduler = _read_json(join('scheduler', 'scheduler_config.json')) or {}
    layout = CheckpointLayout(root, boundary_ratio=index.get('boundary_ratio'),
                              scheduler_shift=scheduler.get('flow_shift', scheduler.get('shift')),
                              **found)
    logger.info('checkpoint layout %s: %s', layout.kind, layout.describe())
    return layout
