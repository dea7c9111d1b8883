"""LoRA files for the DiT experts: read, normalise to this project's names, merge into weights.

A LoRA adds a low-rank delta to some weights: W <- W + strength * scale * (up @ down). It is
merged into the weights while they load (`lora_merge_transform`, a `load_tensors_` transform)
or into a loaded model (`merge_loras_`), so it costs nothing at run time and composes with
whatever the model does afterwards. The delta is computed in float32 and added to the weight
upcast to float32; the sum is rounded once to the weight's stored dtype. Several LoRAs on one
weight are added one after the other in the given order; strength 0 leaves a weight unchanged.

Key families, detected per file (every key of a file must belong to one family):

- A  `diffusion_model.<name>.lora_down.weight` / `.lora_up.weight`, optional `.alpha`
     (ComfyUI, LightX2V; `model.diffusion_model.` is accepted too);
- A' `diffusion_model.<name>.lora_A.weight` / `.lora_B.weight`, usually without alpha;
- B  `lora_unet_<name with '.' written '_'>.lora_down.weight` / `.lora_up.weight` + `.alpha`
     (musubi-tuner, kohya); the underscored names are matched against the model's own names,
     so `ffn_0` or `self_attn_norm_q` need no rules;
- C  `transformer.<diffusers name>.lora_A.weight` / `.lora_B.weight` (diffusers / PEFT), names
     mapped with `wan.utils.formats.DIT_DIFFUSERS_NAMES`; `lora_B.bias` is a bias delta.

In every family `<name>.diff` is a full delta of `<name>.weight` (or of a bare parameter such
as `blocks.N.modulation`) and `<name>.diff_b` a delta of `<name>.bias`; distillation LoRAs use
them for norms and biases. Scale: alpha / rank when `.alpha` is present (rank =
down.shape[0]); for family C, `lora_alpha / r` from the file's `lora_adapter_metadata` when
present (diffusers' own conversions bake alpha into the weights and write none); else 1.

Keys that match no model tensor raise a CheckpointError listing the first few and the counts.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Collection, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, module_tensor_shapes
from .formats import DIT_DIFFUSERS_NAMES, Transform

__all__ = ['LoraSpec', 'Lora', 'parse_lora_arg', 'load_lora', 'lora_merge_transform',
           'merge_loras_']

logger = logging.getLogger(__name__)

# key prefix -> family (longest first: 'model.diffusion_model.' before 'diffusion_model.')
_PREFIXES = (('model.diffusion_model.', 'A'), ('diffusion_model.', 'A'), ('lora_unet_', 'B'),
             ('transformer.', 'C'))
# key suffix -> role of the tensor
_SUFFIXES = (('.lora_down.weight', 'down'), ('.lora_up.weight', 'up'),
             ('.lora_A.weight', 'down'), ('.lora_B.weight', 'up'), ('.lora_B.bias', 'bias'),
             ('.alpha', 'alpha'), ('.diff_b', 'diff_b'), ('.diff', 'diff'))


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the strength to merge it with."""

    path: str
    strength: float = 1.0


def parse_lora_arg(arg: str) -> LoraSpec:
    """'PATH' or 'PATH:STRENGTH' -> LoraSpec.

    The text after the last ':' is the strength when it reads as a number; otherwise the
    whole argument is the path, so Windows paths such as 'C:\\loras\\x.safetensors' (and
    'C:\\loras\\x.safetensors:0.8') parse as expected. Raises ValueError for an empty path,
    an empty strength after ':' or a strength that is not finite.
    """
    if not arg:
        raise ValueError('empty LoRA argument: expected PATH or PATH:STRENGTH')
    path, sep, tail = arg.rpartition(':')
    if not sep:
        return LoraSpec(arg)
    if tail == '':
        raise ValueError(f'LoRA argument {arg!r} ends with ":" but gives no strength '
                         f'(expected PATH or PATH:STRENGTH)')
    try:
        strength = float(tail)
    except ValueError:
        return LoraSpec(arg)  # the colon belongs to the path (a drive letter)
    if not path:
        raise ValueError(f'LoRA argument {arg!r} has no path (expected PATH or PATH:STRENGTH)')
    if not math.isfinite(strength):
        raise ValueError(f'LoRA strength must be a finite number, got {tail!r} in {arg!r}')
    return LoraSpec(path, strength)


@dataclass
class _Module:
    """The tensors a LoRA file holds for one module (keys: role -> tensor)."""

    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    keys: Dict[str, str] = field(default_factory=dict)  # role -> key in the file


class Lora:
    """One LoRA file, normalised: per module the low-rank pair, alpha and full deltas.

    Deltas are computed only when a target weight asks for them (`delta`), in float32.
    """

    def __init__(self, path: str, strength: float, family: str,
                 modules: Dict[str, _Module], default_scale: float = 1.0) -> None:
        self.path = path
        self.strength = float(strength)
        self.family = family  # 'A', "A'", 'B' or 'C'
        self.modules = modules
        self.default_scale = default_scale

    def __repr__(self) -> str:
        return (f'Lora({self.path!r}, strength={self.strength:g}, family={self.family}, '
                f'{len(self.modules)} modules)')

    @property
    def num_keys(self) -> int:
        return sum(len(m.keys) for m in self.modules.values())

    def scale(self, module: str) -> float:
        """alpha / rank when the file gives alpha, else the file's default (usually 1)."""
        m = self.modules[module].tensors
        if 'alpha' in m and 'down' in m:
            return float(m['alpha'].float().reshape(-1)[0]) / m['down'].shape[0]
        return self.default_scale

    # -- matching ---------------------------------------------------------------------------
    def plan(self, expected: Collection[str]) -> Tuple[List[Tuple[str, str, str]], List[str]]:
        """Match this LoRA against the model's tensor names.

        Returns ([(target tensor, module, kind)], [file keys that match nothing]) with kind
        'lowrank', 'diff' (both onto the weight, or onto a bare parameter), 'diff_b' or 'bias'
        (onto the bias).
        """
        lookup = _underscore_names(expected) if self.family == 'B' else None
        targets, unmatched = [], []
        for module, m in self.modules.items():
            dotted = lookup.get(module) if lookup is not None else module
            for kind, roles in (('lowrank', ('up', 'down', 'alpha')), ('diff', ('diff',)),
                                ('diff_b', ('diff_b',)), ('bias', ('bias',))):
                present = [r for r in roles if r in m.tensors]
                if not present or (kind == 'lowrank' and 'up' not in m.tensors):
                    continue
                target = None
                if dotted is not None:
                    if kind in ('lowrank', 'diff'):
                        target = next((t for t in (f'{dotted}.weight', dotted) if t in expected),
                                      None)
                    elif f'{dotted}.bias' in expected:
                        target = f'{dotted}.bias'
                if target is None:
                    unmatched += [m.keys[r] for r in present]
                else:
                    targets.append((target, module, kind))
        return targets, unmatched

    def delta_shape(self, module: str, kind: str) -> Tuple[int, ...]:
        m = self.modules[module].tensors
        if kind == 'lowrank':
            up, down = m['up'], m['down']
            return (up.shape[0],) + tuple(down.shape[1:])
        return tuple(m[kind].shape)

    def delta(self, module: str, kind: str, device: Optional[torch.device] = None
              ) -> torch.Tensor:
        """strength * scale * (up @ down), or strength * diff, in float32 on `device`."""
        m = self.modules[module].tensors
        if kind == 'lowrank':
            up = m['up'].to(device=device, dtype=torch.float32)
            down = m['down'].to(device=device, dtype=torch.float32)
            # conv LoRA: a k x k down kernel and a 1 x 1 up kernel, as flattened matrices
            d = up.flatten(1) @ down.flatten(1)
            return d.reshape(self.delta_shape(module, kind)).mul_(self.strength
                                                                  * self.scale(module))
        factor = self.strength * (self.scale(module) if kind == 'bias' else 1.0)
        return m[kind].to(device=device, dtype=torch.float32) * factor


def _underscore_names(expected: Collection[str]) -> Dict[str, str]:
    """musubi/kohya module names ('blocks_0_self_attn_q') -> ours ('blocks.0.self_attn.q'),
    derived from the model's names (also from their diffusers spellings)."""
    table: Dict[str, str] = {}
    for name in expected:
        module = name[:-len('.weight')] if name.endswith('.weight') else \
            name[:-len('.bias')] if name.endswith('.bias') else name
        for spelling in (module, DIT_DIFFUSERS_NAMES.to_theirs(module)):
            table.setdefault(spelling.replace('.', '_'), module)
    return table


def _describe(names: Sequence[str], n: int = 5) -> str:
    return ', '.join(names[:n]) + (', ...' if len(names) > n else '')


def _split_key(key: str) -> Tuple[Optional[str], str, Optional[str]]:
    """(family, module, role) of a key; family or role None when unknown."""
    family, rest = None, key
    for prefix, fam in _PREFIXES:
        if key.startswith(prefix):
            family, rest = fam, key[len(prefix):]
            break
    for suffix, role in _SUFFIXES:
        if rest.endswith(suffix):
            return family, rest[:-len(suffix)], role
    return family, rest, None


def _metadata_scale(metadata: Mapping[str, str], path: str) -> float:
    """lora_alpha / r of a diffusers/PEFT file's adapter metadata (1 when absent)."""
    raw = metadata.get('lora_adapter_metadata')
    if not raw:
        return 1.0
    try:
        meta = json.loads(raw)
    except Exception as exc:
        raise CheckpointError(f'LoRA {path}: unreadable lora_adapter_metadata: {exc}') from exc
    conf = {k.split('.', 1)[1]: v for k, v in meta.items() if k.startswith('transformer.')} \
        or meta
    if conf.get('rank_pattern') or conf.get('alpha_pattern'):
        raise CheckpointError(f'LoRA {path}: per-module rank_pattern / alpha_pattern in its '
                              f'metadata are not supported')
    r, alpha = conf.get('r'), conf.get('lora_alpha')
    if r is None or alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(r) if conf.get('use_rslora') else float(r))


def load_lora(spec: Union[LoraSpec, str]) -> Lora:
    """Read a LoRA .safetensors file and normalise its keys (see the module docstring).

    Raises FileNotFoundError for a missing file and CheckpointError for an unreadable file,
    unknown or mixed key families and malformed low-rank pairs.
    """
    if isinstance(spec, str):
        spec = LoraSpec(spec)
    path = spec.path
    if not os.path.isfile(path):
        raise FileNotFoundError(f'LoRA file not found: looked for {os.path.abspath(path)}')
    if not path.endswith('.safetensors'):
        raise CheckpointError(f'LoRA {path}: expected a .safetensors file')
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f'cannot read LoRA file {path}: {exc}') from exc
    if not tensors:
        raise CheckpointError(f'LoRA {path} holds no tensors')

    modules: Dict[str, _Module] = {}
    families, unknown, unsupported = set(), [], []
    for key, tensor in tensors.items():
        family, module, role = _split_key(key)
        if family is None:
            unknown.append(key)
            continue
        if role is None:
            unsupported.append(key)
            continue
        families.add(family)
        if family == 'C':
            module = DIT_DIFFUSERS_NAMES.to_ours(module)
        m = modules.setdefault(module, _Module())
        if role in m.tensors:
            raise CheckpointError(f'LoRA {path}: {key} and {m.keys[role]} give the same tensor')
        m.tensors[role], m.keys[role] = tensor, key
    if unknown:
        raise CheckpointError(
            f'LoRA {path}: {len(unknown)} of {len(tensors)} keys are no Wan DiT LoRA keys '
            f'({_describe(sorted(unknown))}); known prefixes: '
            + ', '.join(p for p, _ in _PREFIXES))
    if unsupported:
        raise CheckpointError(
            f'LoRA {path}: {len(unsupported)} keys of an unsupported kind (LoHa/LoKr/DoRA?): '
            f'{_describe(sorted(unsupported))}; supported: '
            + ', '.join(s for s, _ in _SUFFIXES))
    if len(families) > 1:
        raise CheckpointError(f'LoRA {path} mixes key families {", ".join(sorted(families))}')
    family = families.pop()
    for module, m in modules.items():
        t = m.tensors
        if ('up' in t) != ('down' in t):
            have = m.keys.get('up') or m.keys.get('down')
            raise CheckpointError(f'LoRA {path}: {have} has no matching up/down partner')
        if 'alpha' in t and 'down' not in t:
            raise CheckpointError(f'LoRA {path}: {m.keys["alpha"]} has no low-rank pair')
        if 'up' in t:
            up, down = t['up'], t['down']
            rank_ok = up.dim() >= 2 and down.dim() >= 2 and up.shape[1] == down.shape[0]
            conv_ok = up.dim() == 2 or all(s == 1 for s in up.shape[2:])
            if not (rank_ok and conv_ok):
                raise CheckpointError(
                    f'LoRA {path}: {m.keys["up"]} {tuple(up.shape)} and {m.keys["down"]} '
                    f'{tuple(down.shape)} are no low-rank pair (up: out x rank [x 1...], '
                    f'down: rank x in [x kernel])')
    if family == 'A' and any(k.endswith(('.lora_A.weight', '.lora_B.weight'))
                             for k in tensors):
        family = "A'"
    default_scale = _metadata_scale(metadata, path) if family == 'C' else 1.0
    lora = Lora(path, spec.strength, family, modules, default_scale)
    logger.info('LoRA %s: family %s, %d keys on %d modules, strength %g', path, family,
                len(tensors), len(modules), spec.strength)
    return lora


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------

Plan = Dict[str, List[Tuple[Lora, str, str]]]


def _plan(loras: Sequence[Lora], expected: Collection[str]) -> Plan:
    """Target tensor -> the deltas to add, in LoRA order; raises for unmatched LoRA keys and,
    when `expected` maps names to shapes, for deltas of the wrong shape."""
    plan: Plan = {}
    problems = []
    for lora in loras:
        targets, unmatched = lora.plan(expected)
        if unmatched:
            problems.append(f'{lora.path}: {len(unmatched)} of {lora.num_keys} keys match no '
                            f'model tensor ({_describe(sorted(unmatched))})')
        for target, module, kind in targets:
            if isinstance(expected, Mapping):
                want, have = tuple(expected[target]), lora.delta_shape(module, kind)
                if want != have:
                    problems.append(f'{lora.path}: delta for {target} has shape {have}, the '
                                    f'model tensor {want}')
                    continue
            plan.setdefault(target, []).append((lora, module, kind))
    if problems:
        raise CheckpointError('LoRA does not fit the model: ' + '; '.join(problems[:3])
                              + (f'; and {len(problems) - 3} more' if len(problems) > 3 else ''))
    return plan


def _merged(name: str, weight: torch.Tensor, terms: List[Tuple[Lora, str, str]],
            device: Optional[torch.device]) -> torch.Tensor:
    """weight + the deltas, summed in float32 and rounded once to weight's dtype."""
    if not weight.is_floating_point() or weight.dtype.itemsize == 1:
        raise CheckpointError(f'cannot merge a LoRA into {name} stored as {weight.dtype}: merge '
                              f'into dequantized (bf16/fp16/fp32) weights')
    out = weight.to(device=device if device is not None else weight.device,
                    dtype=torch.float32, copy=True)
    for lora, module, kind in terms:
        delta = lora.delta(module, kind, out.device)
        if delta.shape != out.shape:
            raise CheckpointError(f'LoRA {lora.path}: delta for {name} has shape '
                                  f'{tuple(delta.shape)}, the tensor {tuple(out.shape)}')
        out += delta
    return out.to(weight.dtype)


def lora_merge_transform(loras: Sequence[Lora], expected_names: Collection[str], *,
                         device: Optional[Union[str, torch.device]] = None) -> Transform:
    """A `load_tensors_` transform that merges `loras` into the tensors they target.

    `expected_names` are the model's tensor names (a mapping name -> shape, e.g.
    `module_tensor_shapes(model)`, also checks every delta's shape). LoRA keys that match no
    expected name raise CheckpointError here, before any tensor is read; targets that never
    come by in the stream raise at its end. `device`: where to compute the merge (default:
    where each streamed tensor is, i.e. the CPU for safetensors files).
    """
    plan = _plan(loras, expected_names)
    device = torch.device(device) if device is not None else None

    def transform(stream: Iterator[Tuple[str, torch.Tensor]]):
        remaining = set(plan)
        for name, tensor in stream:
            terms = plan.get(name)
            if terms is not None:
                tensor = _merged(name, tensor, terms, device)
                remaining.discard(name)
            yield name, tensor
        if remaining:
            raise CheckpointError(f'{len(remaining)} LoRA target tensor(s) never came in the '
                                  f'checkpoint: {_describe(sorted(remaining))}')

    return transform


@torch.no_grad()
def merge_loras_(model: nn.Module, loras: Sequence[Lora]) -> nn.Module:
    """Merge `loras` into an already loaded `model` in place (same math and errors as
    `lora_merge_transform`); returns the model. Each weight is merged where it lives."""
    tensors = model.state_dict(keep_vars=True)
    plan = _plan(loras, module_tensor_shapes(model))
    for name, terms in plan.items():
        t = tensors[name]
        t.copy_(_merged(name, t.detach(), terms, t.device))
    logger.info('merged %d LoRA(s) into %d tensors', len(loras), len(plan))
    return model
