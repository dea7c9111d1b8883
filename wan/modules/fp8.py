"""fp8 (e4m3) linear layers and attention for Hopper GPUs: opt-in, lossy, measured.

Everything here trades accuracy for speed and is off unless a caller asks for it. Read top to
bottom:

1. `quantize_rowwise` / `dequantize`: absmax scaling of each row (or any set of dims) to
   float8_e4m3fn, with fp32 scales.
2. `Fp8Linear`: a drop-in for the DiT blocks' nn.Linear. Weights are stored in e4m3 with one
   scale per output channel; each call quantizes its input per token (dynamic scales) and
   runs `torch._scaled_mm` with row-wise scales and a bf16 output. The input quantization is
   plain torch ops, so that torch.compile fuses it into the kernel that produces the input
   (the norm/modulation, or the GELU) instead of paying extra passes over the activations.
3. `swap_linears_` and `QUANTIZE_PARTS`: which block linears become Fp8Linear;
   `quantize_transform`: the same quantization applied while the weights load (a loader
   stream transform), so that an fp8 expert never exists in bf16 where it is placed.
4. `fp8_attention`: FlashAttention-3's fp8 path with per-(batch, head) descales and
   mean-centred keys; `fp8_attention_reference` emulates its quantization on any device.
5. `Fp8Schedule`: keep the first and/or last denoising steps in bf16 (`set_fp8_compute_`).

e4m3 has 3 mantissa bits: a rounding error of up to 2^-4 relative per element (about 2.6%
RMS on Gaussian data). Scales are never taken from a Python number (no .item()), so nothing here breaks a
compiled graph.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# The attention module, for its FA3 lookup. Looked up as a module (not `from .attention
# import ...`: the package re-exports a function named `attention`, and attention.py may import
# this file while it is itself being imported).
_attention = importlib.import_module('.attention', __package__)

__all__ = ['FP8_DTYPE', 'FP8_MAX', 'quantize_rowwise', 'dequantize', 'Fp8Linear',
           'QUANTIZE_PARTS', 'expand_parts', 'swap_linears_', 'linears_to_swap',
           'fp8_weight_names', 'quantize_transform', 'set_fp8_compute_',
           'fp8_linear_supported',
           'smooth_keys', 'quantize_attention_inputs', 'fp8_attention',
           'fp8_attention_reference', 'fp8_attention_available', 'Fp8Schedule']

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Floor for a scale. A row of zeros (amax 0) gets this scale and quantizes to zeros instead of
# dividing 0 by 0; any row with amax below FP8_MAX * 1e-12 loses a little resolution, which
# at that magnitude is irrelevant next to the other rows of the matmul.
MIN_SCALE = 1e-12


# ----------------------------------------------------------------------------- quantization
def quantize_rowwise(x: torch.Tensor, dim: Union[int, Sequence[int]] = -1
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Absmax-scale `x` to e4m3: one fp32 scale per slice reduced over `dim`.

    dim=-1 on a weight (out, in) gives one scale per output channel, on activations (tokens,
    features) one per token; dim=(1, 3) on (B, L, H, D) gives one per (batch, head). Returns
    (q, scale) with `scale` keeping the reduced dims as size 1, so that q * scale ~ x.
    The maths is done in fp32 whatever x's dtype: scale = max(amax / 448, MIN_SCALE), then
    x / scale clamped to +-448 (fp32 rounding can land a hair past 448, and a cast past the
    e4m3 range gives NaN on some devices) and cast.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in `dtype` (the inverse of quantize_rowwise, up to e4m3 rounding)."""
    return (q.float() * scale.float()).to(dtype)


# ----------------------------------------------------------------------------- linear
def fp8_linear_supported(device: Union[torch.device, str]) -> bool:
    """Whether `torch._scaled_mm` runs e4m3 on `device`: CPU, or CUDA compute capability 8.9+
    (Ada, Hopper and later)."""
    device = torch.device(device)
    if device.type == 'cpu':
        return hasattr(torch, '_scaled_mm')
    if device.type == 'cuda' and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (per-output-channel scales) and x quantized per token.

    Replaces an nn.Linear that runs under bf16 autocast: the input may be fp32 or bf16 (its
    scales are computed in fp32 either way), the output is bf16. `weight` is a frozen
    Parameter so that parameter counts and byte counts see it (1 byte per element);
    `weight_scale` is an fp32 buffer (out, 1); `bias` is bf16 and added in the GEMM.
    Scales are per token, so how a token is quantized does not depend on the other tokens of
    the call (a CFG batch of two or a sequence shard quantizes exactly as one full pass).

    The weight must stay e4m3: a pass that casts parameters (e.g. to bf16) has to skip this
    module, and `module.to(dtype)` is not supported (forward raises if it happened).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Union[torch.device, str, None] = None):
        super().__init__()
        if in_features % 16 or out_features % 16:
            # torch._scaled_mm on CUDA needs both GEMM dims divisible by 16
            raise ValueError(f'Fp8Linear needs in_features and out_features divisible by 16, '
                             f'got {in_features} -> {out_features}')
        self.in_features = in_features
        self.out_features = out_features
        # False: bf16 compute (the input unquantized, the weight dequantized to bf16) for
        # the steps an Fp8Schedule keeps in bf16 (`set_fp8_compute_`)
        self.compute_fp8 = True
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE,
                                               device=device), requires_grad=False)
        self.register_buffer('weight_scale', torch.ones(out_features, 1, dtype=torch.float32,
                                                        device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16,
                                                 device=device), requires_grad=False)
        else:
            self.register_parameter('bias', None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> 'Fp8Linear':
        """Quantize an nn.Linear's (bf16 or fp32) weight per output channel."""
        weight, scale = quantize_rowwise(linear.weight.detach())
        return cls.from_quantized(weight, scale, linear.bias)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> 'Fp8Linear':
        """Wrap an e4m3 weight (out, in) and its scale: one per output channel ((out,) or
        (out, 1)), or one for the whole tensor (broadcast to every channel), as stored by
        scaled-fp8 checkpoint files. W ~ weight * weight_scale."""
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f'Fp8Linear.from_quantized wants a 2-D {FP8_DTYPE} weight, got '
                             f'{weight.dtype} {tuple(weight.shape)}')
        out_features, in_features = weight.shape
        if weight_scale.numel() not in (1, out_features):
            raise ValueError(f'weight_scale must have 1 or {out_features} (out_features) '
                             f'elements, got shape {tuple(weight_scale.shape)}')
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f'bias must have shape ({out_features},), got '
                             f'{tuple(bias.shape)}')
        module = cls(in_features, out_features, bias=bias is not None, device='meta')
        scale = weight_scale.detach().to(device=weight.device, dtype=torch.float32)
        module.weight = nn.Parameter(weight.detach(), requires_grad=False)
        module.weight_scale = scale.reshape(-1, 1).expand(out_features, 1).contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(weight.device, torch.bfloat16),
                                       requires_grad=False)
        return module

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'bias={self.bias is not None}, weight=e4m3 per-channel, input=e4m3 per-token')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != FP8_DTYPE or self.weight_scale.dtype != torch.float32:
            raise RuntimeError(f'Fp8Linear weight was cast to {self.weight.dtype} (scale '
                               f'{self.weight_scale.dtype}); fp8 modules must not be dtype-cast')
        if not self.compute_fp8:
            weight = dequantize(self.weight, self.weight_scale, torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), weight, self.bias)
        lead = x.shape[:-1]
        xq, x_scale = quantize_rowwise(x.reshape(-1, self.in_features))
        # _scaled_mm wants A row-major (M, K) and B column-major (K, N): W^T of a row-major
        # (N, K) weight is exactly that, as a view. Row-wise scales: (M, 1) and (1, N).
        y = torch._scaled_mm(xq.contiguous(), self.weight.t(), scale_a=x_scale,
                             scale_b=self.weight_scale.t(), bias=self.bias,
                             out_dtype=torch.bfloat16)
        return y.reshape(*lead, self.out_features)


# ----------------------------------------------------------------------------- module swap
# What `--quantize` may name: part -> (linears inside each WanAttentionBlock, one line of help)
_PART_LINEARS: Dict[str, Tuple[str, ...]] = {
    'ffn': ('ffn.0', 'ffn.2'),
    'attn_proj': ('self_attn.q', 'self_attn.k', 'self_attn.v', 'self_attn.o'),
    'cross_attn': ('cross_attn.q', 'cross_attn.k', 'cross_attn.v', 'cross_attn.o'),
}
QUANTIZE_PARTS: Dict[str, str] = {
    'ffn': 'feed-forward linears (ffn.0, ffn.2): about 2/3 of the block GEMM work',
    'attn_proj': 'self-attention projections (self_attn.q/k/v/o)',
    'cross_attn': 'cross-attention projections (cross_attn.q/k/v/o; k/v see the 512 text '
                  'tokens)',
    'all': 'ffn + attn_proj + cross_attn: every linear inside the transformer blocks',
}


def expand_parts(parts: Union[str, Collection[str]]) -> Tuple[str, ...]:
    """Validate part names and expand 'all'; returns the parts in QUANTIZE_PARTS order."""
    if isinstance(parts, str):
        parts = (parts,)
    unknown = [p for p in parts if p not in QUANTIZE_PARTS]
    if unknown:
        valid = '; '.join(f'{k}: {v}' for k, v in QUANTIZE_PARTS.items())
        raise ValueError(f'unknown fp8 quantize part(s) {unknown}; valid parts are {valid}')
    chosen = set(_PART_LINEARS) if 'all' in parts else set(parts)
    return tuple(p for p in _PART_LINEARS if p in chosen)


def _chosen_linears(model: nn.Module, parts: Union[str, Collection[str]]):
    """(block-relative name, parent module, attribute, module) of each chosen block linear."""
    from .model import WanAttentionBlock  # model.py imports attention, not this module
    names = [n for p in expand_parts(parts) for n in _PART_LINEARS[p]]
    for block in model.modules():
        if not isinstance(block, WanAttentionBlock):
            continue
        for name in names:
            parent_name, _, child = name.rpartition('.')
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, child)
            if not isinstance(linear, (nn.Linear, Fp8Linear)):
                raise TypeError(f'{name} is a {type(linear).__name__}, expected nn.Linear')
            yield name, parent, child, linear


def swap_linears_(model: nn.Module, parts: Union[str, Collection[str]]) -> int:
    """Replace the chosen linears of every WanAttentionBlock in `model` by Fp8Linear, in place.

    Only block linears can be chosen: the fp32 islands (time embedding and projection, head,
    norms, modulation) and the patch/text embeddings are never touched. Linears that are
    already Fp8Linear are left as they are. A linear on the meta device becomes an empty
    Fp8Linear on meta (for a model about to load its weights through `quantize_transform`).
    Returns the number of linears replaced now. Call it on the plain model (before FSDP
    wrapping or torch.compile).
    """
    replaced = 0
    for _, parent, child, linear in list(_chosen_linears(model, parts)):
        if isinstance(linear, Fp8Linear):
            continue
        if linear.weight.is_meta:
            new = Fp8Linear(linear.in_features, linear.out_features,
                            bias=linear.bias is not None, device='meta')
        else:
            new = Fp8Linear.from_linear(linear)
        setattr(parent, child, new)
        replaced += 1
    logging.info('fp8 linears: %d replaced (%s)', replaced, ', '.join(expand_parts(parts)))
    return replaced


def set_fp8_compute_(model: nn.Module, on: bool) -> int:
    """Switch every Fp8Linear of `model` between fp8 compute (on) and bf16 compute on its
    dequantized weight (off); returns how many there are."""
    count = 0
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.compute_fp8 = on
            count += 1
    return count


def linears_to_swap(model: nn.Module, parts: Union[str, Collection[str]]) -> int:
    """How many of the chosen block linears are still nn.Linear (0: all are fp8 already)."""
    return sum(isinstance(m, nn.Linear) for *_, m in _chosen_linears(model, parts))


def fp8_weight_names(model: nn.Module) -> Tuple[str, ...]:
    """The state-dict names of the weights of `model`'s Fp8Linear modules."""
    return tuple(f'{name}.weight' for name, m in model.named_modules()
                 if isinstance(m, Fp8Linear))


def quantize_transform(weight_names: Collection[str], device: Union[torch.device, str],
                       dtype_rule: Callable[[str, torch.Tensor], torch.dtype]
                       ) -> Callable[[Iterator[Tuple[str, torch.Tensor]]],
                                     Iterator[Tuple[str, torch.Tensor]]]:
    """A loader stream transform: each weight named in `weight_names` (an Fp8Linear's, in
    model naming) is cast to the dtype `dtype_rule` gives it, moved to `device` and
    quantized there per output channel, exactly as `Fp8Linear.from_linear` quantizes a
    loaded linear; it is replaced in the stream by its e4m3 weight and its fp32
    `<layer>.weight_scale` (out, 1), and the layer's bias is cast to bf16. A weight that
    arrives in e4m3 already (a scaled-fp8 file's, with its scale next in the stream) passes
    as it is. Other tensors pass through. So the bf16 copy of a quantized weight exists only
    on `device`, one tensor at a time. `weight_names` is read when the stream starts (a
    `before_load` hook may fill it until then, as with the layout's `fp8_transform`)."""
    def transform(stream: Iterator[Tuple[str, torch.Tensor]]
                  ) -> Iterator[Tuple[str, torch.Tensor]]:
        names = frozenset(weight_names)
        biases = frozenset(n[:-len('weight')] + 'bias' for n in names)
        for name, tensor in stream:
            if name in names and tensor.dtype == FP8_DTYPE:
                yield name, tensor  # stored fp8: its weight_scale follows in the stream
            elif name in names:
                w = tensor.to(device=device, dtype=dtype_rule(name, tensor))
                q, scale = quantize_rowwise(w)
                del w
                yield name, q
                yield name[:-len('weight')] + 'weight_scale', \
                    scale.to(torch.float32).reshape(-1, 1).contiguous()
            elif name in biases:
                yield name, tensor.to(torch.bfloat16)
            else:
                yield name, tensor
    return transform


# ----------------------------------------------------------------------------- attention
def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """k minus its mean over tokens, per (batch, head, channel), in fp32. k: (B, L, H, D).

    Softmax ignores it: for a query q, q.(k_j - m) = q.k_j - q.m, and q.m is the same for
    every key j, so it cancels between the numerator and the denominator of the softmax. It
    matters for quantization: keys often share a large per-channel offset, which would take
    most of a per-head fp8 scale and leave few levels for what differs between keys.
    """
    kf = k.float()
    return kf - kf.mean(dim=1, keepdim=True)


def quantize_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              smooth_k: bool = True):
    """e4m3 q, k, v (B, L, H, D) with one fp32 scale per (batch, head) each, shaped (B, H)
    as FA3's q_descale/k_descale/v_descale. Returns ((q8, q_scale), (k8, k_scale),
    (v8, v_scale)); k is mean-centred first when smooth_k."""
    b, h = q.shape[0], q.shape[2]
    out = []
    for t in (q, smooth_keys(k) if smooth_k else k, v):
        t8, scale = quantize_rowwise(t, dim=(1, 3))
        out.append((t8, scale.reshape(b, h)))
    return tuple(out)


def fp8_attention_available(device: Union[torch.device, str, None] = None) -> bool:
    """FA3's fp8 kernels exist for Hopper (compute capability 9.x) only."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else torch.device('cuda')
    if device.type != 'cuda' or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    return _attention._fa3_module() is not None


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  softmax_scale: Optional[float] = None, smooth_k: bool = True) -> torch.Tensor:
    """Non-causal attention through FlashAttention-3's e4m3 kernel; bf16 (B, L, H, D) out.

    q, k, v: (B, L, H, D), same number of heads, head_dim 64/96/128/192/256, dense (no
    per-sample lengths). Scales are per (batch, head): the kernel takes descales of shape
    (batch, heads_k) and nothing finer (no per-token-block scales), so a head's largest
    value sets the resolution of all its tokens. Inside the kernel the softmax
    probabilities are also rounded to e4m3 for the P.V product (`fp8_attention_reference`
    with round_probs=True emulates that).
    """
    mod = _attention._fa3_module()
    if mod is None or not q.is_cuda:
        raise RuntimeError('fp8 attention needs FlashAttention-3 (flash_attn_interface or the '
                           'fa3-fwd wheel) on a Hopper GPU')
    (q8, qs), (k8, ks), (v8, vs) = quantize_attention_inputs(q, k, v, smooth_k)
    out = mod.flash_attn_func(q8, k8, v8, softmax_scale=softmax_scale, causal=False,
                              q_descale=qs, k_descale=ks, v_descale=vs)
    return out[0] if isinstance(out, (tuple, list)) else out


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            softmax_scale: Optional[float] = None, smooth_k: bool = True,
                            quantize: bool = True, round_probs: bool = False) -> torch.Tensor:
    """What `fp8_attention` computes, emulated exactly in fp32 on any device: q, k, v
    quantized as there (quantize=False skips it), dequantized, then softmax(q k^T s) v in
    fp32. round_probs additionally rounds the probabilities to e4m3 the way FA3's fp8 kernel
    does (exp(s - rowmax) * 2^8, so that they use the e4m3 range up to 256, while the
    normalising sum uses the unrounded values). Returns fp32 (B, L, H, D)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if quantize:
        (q8, qs), (k8, ks), (v8, vs) = quantize_attention_inputs(q, k, v, smooth_k)
        qf, kf, vf = (dequantize(t, s[:, None, :, None]) for t, s in
                      ((q8, qs), (k8, ks), (v8, vs)))
    else:
        qf, kf, vf = q.float(), smooth_keys(k) if smooth_k else k.float(), v.float()
    s = torch.einsum('blhd,bmhd->bhlm', qf, kf) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    denom = p.sum(dim=-1)  # (B, H, L)
    if round_probs:
        p = (p * 256).to(FP8_DTYPE).float() / 256
    out = torch.einsum('bhlm,bmhd->blhd', p, vf)
    return out / denom.transpose(1, 2).unsqueeze(-1)


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Fp8Schedule:
    """Which denoising steps use the fp8 modules: all but the first `first_bf16` and the
    last `last_bf16` steps (some engines keep those in bf16 for layout and fine detail).
    In the bf16 steps the fp8 linears compute in bf16 on their dequantized weights (the
    weights are stored in e4m3 only) and self-attention runs on the exact kernel."""
    first_bf16: int = 0
    last_bf16: int = 0

    def __post_init__(self):
        if self.first_bf16 < 0 or self.last_bf16 < 0:
            raise ValueError(f'fp8 schedule: bf16 step counts must be >= 0, got '
                             f'first={self.first_bf16}, last={self.last_bf16}')

    def use_fp8(self, step_index: int, num_steps: int) -> bool:
        if not 0 <= step_index < num_steps:
            raise ValueError(f'step_index {step_index} outside 0..{num_steps - 1}')
        return self.first_bf16 <= step_index < num_steps - self.last_bf16
