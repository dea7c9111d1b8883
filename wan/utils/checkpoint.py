"""The one checkpoint loader: reads the released file formats and streams tensors into models.

Formats of the released checkpoint (docs/CHECKPOINTS.md):
- DiT experts: a folder with `config.json` and either sharded safetensors with
  `diffusion_pytorch_model.safetensors.index.json`, or a single
  `diffusion_pytorch_model.safetensors`.
- T5 and VAE: a `torch.save` state dict (`.pth`), read with `weights_only=True` and mmap so
  that an 11 GB file is not copied into host memory at once.

`check_checkpoint_dir` checks a whole pipeline folder before anything is built: every file
present (each shard its index lists included), every json parsable, every safetensors header
consistent with its file size and every `.pth` a complete torch.save archive.

Models are built on the meta device; `load_tensors_` then assigns each checkpoint tensor,
converted to the target device and dtype, in place of the meta parameter. Tensors are read one
at a time (safetensors) or from an mmapped pickle, so host memory holds at most about one
shard beyond what the model itself occupies.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    'CheckpointError', 'require_file', 'read_pth', 'safetensors_files', 'iter_safetensors',
    'iter_pth', 'load_tensors_', 'module_tensor_shapes', 'save_sharded_safetensors', 'chain',
    'Rename', 'Transform', 'DtypeRule', 'Place', 'TensorStream',
    'check_checkpoint_dir', 'check_pth_file', 'read_safetensors_header', 'read_json',
]

SAFETENSORS_INDEX = 'diffusion_pytorch_model.safetensors.index.json'
SAFETENSORS_SINGLE = 'diffusion_pytorch_model.safetensors'


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not match the model."""


def require_file(path: str, what: str) -> str:
    """Return `path` if it is a file, else raise FileNotFoundError naming what and where."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} not found: looked for {os.path.abspath(path)}')
    return path


def read_pth(path: str) -> Dict[str, torch.Tensor]:
    """Load a plain tensor state dict saved with torch.save, safely and memory-mapped."""
    require_file(path, 'checkpoint file')
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as exc:  # pickle errors, truncated zip, non-tensor payloads
        raise CheckpointError(f'cannot read checkpoint {path}: {exc}') from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f'{path} is not a state dict of tensors')
    return sd


def iter_pth(path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from read_pth(path).items()


def read_json(path: str, what: str) -> dict:
    """Parse a json file; CheckpointError naming the file if it is not valid json."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'cannot parse {what} {path}: {exc}') from exc


def check_pth_file(path: str) -> None:
    """Cheap completeness check of a torch.save file: a zip archive whose directory is intact
    and whose members all lie inside the file (a truncated copy fails here)."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic != b'PK\x03\x04':
        raise CheckpointError(f'checkpoint {path} is not a torch.save zip archive (damaged, or '
                              f'saved in the legacy format, which cannot be memory-mapped)')
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f'checkpoint {path} is truncated or damaged: not a complete '
                              f'torch.save archive ({size} bytes)')
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f'checkpoint {path} is damaged: {exc}') from exc
    if not any(m.filename.endswith('data.pkl') for m in members):
        raise CheckpointError(f'checkpoint {path} is not a torch.save archive (no data.pkl)')
    for m in members:
        if m.header_offset + m.compress_size > size:
            raise CheckpointError(f'checkpoint {path} is truncated: member {m.filename} ends '
                                  f'past the end of the file ({size} bytes)')


def read_safetensors_header(path: str) -> Dict[str, dict]:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), checked
    against the file size; CheckpointError naming the file if it is truncated or not one."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        length = int.from_bytes(head, 'little') if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise CheckpointError(f'safetensors file {path} is truncated or damaged: its '
                                  f'header does not fit in its {size} bytes')
        try:
            header = json.loads(f.read(length))
            header.pop('__metadata__', None)
            end = max((int(v['data_offsets'][1]) for v in header.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CheckpointError(f'safetensors file {path} is damaged: unreadable header '
                                  f'({exc})') from exc
    if 8 + length + end != size:
        raise CheckpointError(f'safetensors file {path} is truncated or damaged: {size} bytes, '
                              f'its header describes {8 + length + end}')
    return header


def check_checkpoint_dir(config, checkpoint_dir: Optional[str]) -> None:
    """Fail before building anything if the pipeline folder is incomplete or damaged.

    FileNotFoundError names every missing item (the T5 and VAE files, the tokenizer folder,
    each expert's config.json, index and every shard the index lists) and where it was looked
    for; CheckpointError names each file that is present but unusable (json that does not
    parse, a truncated or garbage safetensors shard or .pth, an index whose shard lacks a
    tensor it lists). Reads only headers and directories: seconds even for the 126 GB
    release.
    """
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f'checkpoint directory not found: {checkpoint_dir!r} '
                                f'(looked for {os.path.abspath(checkpoint_dir or ".")})')
    missing, pth_files, experts = [], [], []
    for rel, kind in [(config.t5_checkpoint, 'file'), (config.vae_checkpoint, 'file'),
                      (config.t5_tokenizer, 'dir')]:
        path = os.path.join(checkpoint_dir, rel)
        if not (os.path.isfile(path) if kind == 'file' else os.path.isdir(path)):
            missing.append(path)
        elif kind == 'file':
            pth_files.append(path)
    for sub in (config.low_noise_checkpoint, config.high_noise_checkpoint):
        folder = os.path.join(checkpoint_dir, sub)
        if not os.path.isfile(os.path.join(folder, 'config.json')):
            missing.append(os.path.join(folder, 'config.json'))
        index = os.path.join(folder, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            weight_map = read_json(index, 'shard index').get('weight_map')
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f'shard index {index} has no weight_map')
            shards = {}
            for name, shard in weight_map.items():
                shards.setdefault(os.path.join(folder, shard), []).append(name)
            missing += [p for p in sorted(shards) if not os.path.isfile(p)]
            experts.append((folder, shards))
        elif os.path.isfile(os.path.join(folder, SAFETENSORS_SINGLE)):
            experts.append((folder, {os.path.join(folder, SAFETENSORS_SINGLE): None}))
        else:
            missing.append(os.path.join(folder, SAFETENSORS_SINGLE + '[.index.json]'))
    if missing:
        raise FileNotFoundError(
            f'checkpoint {os.path.abspath(checkpoint_dir)} is incomplete; missing: '
            + ', '.join(missing))
    for path in pth_files:
        check_pth_file(path)
    for folder, shards in experts:
        read_json(os.path.join(folder, 'config.json'), 'DiT config')
        for path, names in shards.items():
            header = read_safetensors_header(path)
            absent = [n for n in names or () if n not in header]
            if absent:
                raise CheckpointError(f'safetensors file {path} lacks tensors that '
                                      f'{SAFETENSORS_INDEX} assigns to it: {_describe(absent)}')


def safetensors_files(folder: str) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """Return the shard paths of a diffusers-style folder and the index's weight map (or None)."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    single_path = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)['weight_map']
        except Exception as exc:
            raise CheckpointError(f'cannot read shard index {index_path}: {exc}') from exc
        shards = sorted(set(weight_map.values()))
        paths = [os.path.join(folder, s) for s in shards]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f'{len(missing)} safetensors shard(s) listed in {index_path} not found: '
                f'looked for {", ".join(missing[:3])}' + (' ...' if len(missing) > 3 else ''))
        return paths, weight_map
    if os.path.isfile(single_path):
        return [single_path], None
    raise FileNotFoundError(
        f'no safetensors weights in {os.path.abspath(folder)}: looked for {SAFETENSORS_INDEX} '
        f'and {SAFETENSORS_SINGLE}')


def iter_safetensors(paths: Iterable[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time from safetensors files (CPU, mmapped)."""
    from safetensors import safe_open
    for path in paths:
        try:
            with safe_open(path, framework='pt', device='cpu') as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except FileNotFoundError:
            raise
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f'cannot read safetensors file {path}: {exc}') from exc


def module_tensor_shapes(module: nn.Module) -> Dict[str, torch.Size]:
    """Names and shapes of every tensor a checkpoint of `module` must hold."""
    return {name: t.shape for name, t in module.state_dict(keep_vars=True).items()}


def _describe(names: List[str], n: int = 5) -> str:
    shown = ', '.join(names[:n])
    return f'{len(names)} ({shown}{", ..." if len(names) > n else ""})'


def _check_names(expected: Dict[str, torch.Size], names: Iterable[str], source: str) -> None:
    """Fail early, before loading anything, if the set of names is wrong."""
    names = set(names)
    unknown = sorted(names - expected.keys())
    missing = sorted(expected.keys() - names)
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f'missing tensors: {_describe(missing)}')
        if unknown:
            parts.append(f'unexpected tensors: {_describe(unknown)}')
        raise CheckpointError(f'checkpoint {source} does not match the model: ' + '; '.join(parts))


TensorStream = Iterator[Tuple[str, torch.Tensor]]
# (checkpoint name) -> model name, or None to drop the tensor
Rename = Callable[[str], Optional[str]]
# a stream of (model name, tensor) -> a stream of (model name, tensor): name mapping is done,
# here go LoRA merges, dequantization of stored fp8, quantization to fp8, ...
Transform = Callable[[TensorStream], TensorStream]
# (model name, tensor) -> dtype to store it in (wan/utils/dtype_policy.py)
DtypeRule = Callable[[str, torch.Tensor], torch.dtype]
# (model name, tensor already in its dtype) -> the tensor where it will live
Place = Callable[[str, torch.Tensor], torch.Tensor]


def chain(*transforms: Optional[Transform]) -> Optional[Transform]:
    """Compose stream transforms left to right (None entries are skipped)."""
    steps = [t for t in transforms if t is not None]
    if not steps:
        return None

    def run(stream: TensorStream) -> TensorStream:
        for step in steps:
            stream = step(stream)
        return stream
    return run


def load_tensors_(module: nn.Module,
                  tensors: Iterable[Tuple[str, torch.Tensor]],
                  *,
                  source: str,
                  device: torch.device | str = 'cpu',
                  dtype: Optional[torch.dtype | DtypeRule] = None,
                  expected_names: Optional[Iterable[str]] = None,
                  keep_dtype: Optional[Callable[[str], bool]] = None,
                  rename: Optional[Rename] = None,
                  transform: Optional[Transform] = None,
                  place: Optional[Place] = None) -> nn.Module:
    """Assign checkpoint tensors to `module` (usually built on the meta device), in place.

    The stream is read one tensor at a time: each name goes through `rename`, the stream
    through `transform`; each tensor is then checked against the model's name and shape,
    converted to its dtype -- `dtype` is one dtype for every floating tensor (unless
    `keep_dtype(name)`), or a rule (name, tensor) -> dtype; None keeps the file's -- and put
    where it lives (`place(name, tensor)`, default: `.to(device)`), replacing the meta
    parameter or buffer. So a tensor exists on the host only in the file's dtype, for the time
    of its own conversion. Unknown, missing or mis-shaped tensors raise CheckpointError listing
    the first few names and the counts. `expected_names`, when known ahead (a shard index, in
    checkpoint naming), is checked before any tensor is read.
    """
    expected = module_tensor_shapes(module)
    if expected_names is not None:
        names = expected_names if rename is None else \
            [n for n in map(rename, expected_names) if n is not None]
        if transform is None:  # a transform may add or remove tensors (e.g. fp8 scales)
            _check_names(expected, names, source)
    stream: TensorStream = iter(tensors)
    if rename is not None:
        stream = ((new, t) for new, t in ((rename(n), t) for n, t in stream) if new is not None)
    if transform is not None:
        stream = transform(stream)
    seen, unknown, misshaped = set(), [], []
    for name, tensor in stream:
        if name not in expected:
            unknown.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name]):
            misshaped.append(f'{name}: checkpoint {tuple(tensor.shape)} vs model '
                             f'{tuple(expected[name])}')
            continue
        if callable(dtype):
            target_dtype = dtype(name, tensor)
        elif dtype is None or not tensor.is_floating_point() or (keep_dtype and keep_dtype(name)):
            target_dtype = tensor.dtype
        else:
            target_dtype = dtype
        if place is None:
            value = tensor.to(device=device, dtype=target_dtype, copy=False)
        else:
            value = place(name, tensor.to(dtype=target_dtype, copy=False))
        _assign(module, name, value)
        seen.add(name)
    missing = sorted(expected.keys() - seen)
    if unknown or missing or misshaped:
        parts = []
        if missing:
            parts.append(f'missing tensors: {_describe(missing)}')
        if unknown:
            parts.append(f'unexpected tensors: {_describe(sorted(unknown))}')
        if misshaped:
            parts.append(f'mis-shaped tensors: {_describe(misshaped, 3)}')
        raise CheckpointError(f'checkpoint {source} does not match the model: ' + '; '.join(parts))
    logging.debug('loaded %d tensors from %s', len(seen), source)
    return module


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition('.')
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:  # pragma: no cover - module_tensor_shapes only lists parameters and buffers
        raise CheckpointError(f'{name} is neither a parameter nor a buffer')


def save_sharded_safetensors(state_dict: Dict[str, torch.Tensor], folder: str,
                             max_shard_bytes: int) -> List[str]:
    """Write `state_dict` in the released DiT layout: shards + index json (diffusers naming)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    n = len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        fname = (f'diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors'
                 if n > 1 else SAFETENSORS_SINGLE)
        save_file(shard, os.path.join(folder, fname), metadata={'format': 'pt'})
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        with open(os.path.join(folder, SAFETENSORS_INDEX), 'w') as f:
            json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
    return files
