"""Memory planner of the optimized pipeline: where every model lives, over GPU and host memory.

Given the GPU memory the pipeline may use (free memory, or a `--gpu_memory_gib` cap), the host
memory available, the model sizes and the video size, `plan_memory` decides for one generate():

- per expert: `resident` (all its weights on the GPU for the loop) or `streamed` (weights in
  page-locked host memory; its non-block weights stay on the GPU and its blocks are copied into
  `STREAM_SLOTS` GPU slots on a side stream, block i+1 while block i computes). Preference:
  every expert resident > the experts that run the most steps resident > every expert streamed;
- the CFG scheme per expert: `batched` (one batch-2 pass; only when asked and it fits),
  `sequential` (two batch-1 passes), `interleaved` (two batch-1 passes run block by block on the
  same block, so that a streamed block is copied once per step), or `parallel` (CFG parallelism:
  one pass per rank);
- the T5 placement: `gpu` (stays on the GPU), `gpu_then_freed` (encodes on the GPU, leaves
  afterwards), `streamed` (its blocks stream like an expert's) or `cpu` (encodes on the CPU);
- which experts leave the GPU before the VAE decode (none: the decode runs beside them);
- the host placement of each model: `none` (it lives on the GPU only), `pinned` (page-locked
  host memory: what streams or moves back and forth), `pageable`, or `reload` (no room on the
  host: freed after use and read again from the checkpoint when next needed).

Budget phases: T5 encodes before the loop (beside the resident weights), the loop runs one
expert at a time (a streamed expert holds its block slots only while it runs), the decode
runs after the loop (activations and slots freed). Each phase must fit in the GPU budget
(usable bytes minus `GPU_MARGIN_BYTES`); what lives on the host must fit in the host budget
(available bytes minus `HOST_MARGIN_BYTES`). A run that cannot fit gets a plan with
`fits=False` and one `error` line naming the shortfall.

The activation model is linear in the token count: one constant per token and batch element,
measured, scaled with the model widths. Every other size is an input.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

__all__ = ['GiB', 'ACT_BYTES_PER_TOKEN_A14B', 'VAE_DECODE_BYTES_PER_PIXEL', 'T5_ENCODE_BYTES',
           'GPU_MARGIN_BYTES', 'HOST_MARGIN_BYTES', 'STREAM_SLOTS', 'ExpertSize', 'ModelSizes',
           'ExpertPlan', 'MemoryPlan', 'PlacementError', 'plan_memory', 'cpu_plan', 'log_plan',
           'tokens_for', 'activation_bytes', 'held_state_bytes', 'vae_decode_bytes', 'video_bytes',
           'dit_param_count', 'dit_block_param_count', 't5_param_count',
           't5_block_param_count', 'module_bytes']

GiB = 2**30

# Peak activation bytes per token and per batch element of one optimized DiT forward at the
# A14B widths (dim 5120, ffn 13824), headroom included. Measured on the H200 (one compiled
# expert, FA3, batch 1; bench/activation_check.py,
# bench/results/h200_activation_{1280x720,832x480}_9877069.json): peak above the weights
# 5.56 GiB at 1280*720 and 2.41 GiB at 832*480 (77.1 KiB/token both); rounded up by ~9%.
# Re-measure it whenever the forward's activation peak changes.
ACT_BYTES_PER_TOKEN_A14B = 84 * 1024
# Peak of the optimized Wan2.1 VAE decode per output pixel of one chunk, weights and output
# video not included: the probe decode (3 latent frames, every later chunk repeats its shapes)
# measured 15.7 GiB at 1280*720 and 6.8 GiB at 832*480 on the H100
# (bench/results/h100_1280x720_both_607d0d0.log, h100_832x480_both_a9aec23.log), both
# ~18.3 KB per pixel. The whole decode adds the fp32 output video, held about three times
# while it is assembled (the chunk list, the concatenation, the contiguous copy). A measured
# probe replaces this estimate (`vae_decode_bytes_measured`).
VAE_DECODE_BYTES_PER_PIXEL = 15.7 * GiB / (1280 * 720)
# umT5 activations for one 512-token prompt (a few hundred MB at most; generous estimate)
T5_ENCODE_BYTES = GiB // 2
# GPU: allocator fragmentation, cuBLAS/attention workspaces, compile buffers
GPU_MARGIN_BYTES = 3 * GiB
# host: the Python process, libraries, the decoded video, loader buffers
HOST_MARGIN_BYTES = 4 * GiB
# GPU block slots of a streamed model: block i computes while block i+1 is copied in
STREAM_SLOTS = 2

RESIDENT, STREAMED = 'resident', 'streamed'
CFG_SCHEMES = ('batched', 'sequential', 'interleaved', 'parallel')
T5_PLACEMENTS = ('gpu', 'gpu_then_freed', 'streamed', 'cpu')
HOST_PLACEMENTS = ('none', 'pinned', 'pageable', 'reload')

# the released Wan2.1 VAE (encoder + decoder), fp32
WAN21_VAE_PARAMS = 126_892_531


class PlacementError(RuntimeError):
    """The run does not fit in GPU and host memory (the message names the shortfall)."""


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertSize:
    """One DiT expert as stored (bytes in its stored dtypes) and how many steps it runs."""
    name: str
    total_bytes: int
    block_bytes: int  # the largest transformer block
    num_blocks: int
    steps: int

    @property
    def non_block_bytes(self) -> int:
        """Embeddings, time MLP, head: on the GPU for the whole loop, also when streamed."""
        return self.total_bytes - self.num_blocks * self.block_bytes


@dataclass(frozen=True)
class ModelSizes:
    """Everything the planner needs to know about the models. `experts` in run order."""
    experts: Tuple[ExpertSize, ...]
    t5_bytes: int
    t5_block_bytes: int
    t5_num_blocks: int
    vae_bytes: int
    dim: int = 5120  # DiT widths: scale the activation model
    ffn_dim: int = 13824

    @property
    def t5_non_block_bytes(self) -> int:
        return self.t5_bytes - self.t5_num_blocks * self.t5_block_bytes

    @classmethod
    def a14b(cls, steps: Tuple[int, int] = (26, 14), dtype_bytes: int = 2) -> 'ModelSizes':
        """t2v-A14B with both experts and T5 in a `dtype_bytes` dtype (bf16: 26.6 GiB per
        expert, 10.6 GiB T5) and the fp32 VAE. `steps`: (high noise, low noise); the default
        schedule (40 UniPC steps, shift 12, boundary 0.875) runs 26 + 14."""
        dim, ffn, layers = 5120, 13824, 40
        experts = tuple(ExpertSize(name, dtype_bytes * dit_param_count(dim, ffn, layers),
                                   dtype_bytes * dit_block_param_count(dim, ffn), layers, n)
                        for name, n in zip(('high_noise', 'low_noise'), steps))
        return cls(experts=experts, t5_bytes=dtype_bytes * t5_param_count(),
                   t5_block_bytes=dtype_bytes * t5_block_param_count(), t5_num_blocks=24,
                   vae_bytes=4 * WAN21_VAE_PARAMS, dim=dim, ffn_dim=ffn)

    @classmethod
    def from_modules(cls, experts: Sequence[Tuple[str, nn.Module, int]], t5: nn.Module,
                     vae: nn.Module) -> 'ModelSizes':
        """Measured from the modules (meta-device modules work: only shapes and dtypes are
        read). `experts`: (name, WanModel, steps) in run order; `t5` the umT5 encoder and `vae`
        the VAE network, each with its weights in the dtypes they will be stored in."""
        sizes = tuple(ExpertSize(name, module_bytes(m), max(module_bytes(b) for b in m.blocks),
                                 len(m.blocks), steps) for name, m, steps in experts)
        first = experts[0][1]
        return cls(experts=sizes, t5_bytes=module_bytes(t5),
                   t5_block_bytes=max(module_bytes(b) for b in t5.blocks),
                   t5_num_blocks=len(t5.blocks), vae_bytes=module_bytes(vae),
                   dim=first.dim, ffn_dim=first.ffn_dim)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, in their dtypes."""
    return sum(t.numel() * t.element_size()
               for t in itertools.chain(module.parameters(), module.buffers()))


def dit_block_param_count(dim: int, ffn_dim: int) -> int:
    # self- and cross-attention q/k/v/o with biases, FFN with biases, q/k RMSNorms of both
    # attentions, the affine cross-attention LayerNorm, the block's modulation table
    return 8 * (dim * dim + dim) + 2 * dim * ffn_dim + ffn_dim + dim + 4 * dim + 2 * dim + \
        6 * dim


def dit_param_count(dim: int, ffn_dim: int, num_layers: int, freq_dim: int = 256,
                    text_dim: int = 4096, in_dim: int = 16, out_dim: int = 16) -> int:
    non_block = (in_dim * 4 * dim + dim) + (text_dim * dim + dim) + (dim * dim + dim) + \
        (freq_dim * dim + dim) + (dim * dim + dim) + (dim * 6 * dim + 6 * dim) + 2 * dim + \
        (dim * 4 * out_dim + 4 * out_dim)
    return num_layers * dit_block_param_count(dim, ffn_dim) + non_block


def t5_block_param_count(dim: int = 4096, dim_attn: int = 4096, dim_ffn: int = 10240,
                         num_heads: int = 64, num_buckets: int = 32) -> int:
    # two RMSNorm scales, q/k/v/o, gated FFN (gate, fc1, fc2), per-block relative position bias
    return 2 * dim + 4 * dim * dim_attn + 3 * dim * dim_ffn + num_buckets * num_heads


def t5_param_count(vocab: int = 256384, dim: int = 4096, num_layers: int = 24, **block) -> int:
    """umT5-XXL encoder: token embedding, blocks, final norm."""
    return vocab * dim + num_layers * t5_block_param_count(dim=dim, **block) + dim


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------

def tokens_for(size: Sequence[int], frame_num: int, vae_stride: Sequence[int] = (4, 8, 8),
               patch: Sequence[int] = (1, 2, 2)) -> int:
    """DiT tokens of one video: latent frames x latent rows x latent columns, patchified."""
    w, h = size
    t = (frame_num - 1) // vae_stride[0] + 1
    return t // patch[0] * (h // vae_stride[1] // patch[1]) * (w // vae_stride[2] // patch[2])


def activation_bytes(tokens: int, batch: int, dim: int = 5120, ffn_dim: int = 13824,
                     per_sample_time: bool = True,
                     bytes_per_token: float = ACT_BYTES_PER_TOKEN_A14B) -> float:
    """Peak activation bytes of one DiT forward: `bytes_per_token` (at the A14B widths) scaled
    with the widths, times tokens and batch."""
    scale = (dim * 26 + ffn_dim * 4) / (5120 * 26 + 13824 * 4)
    per_token = bytes_per_token * scale
    if not per_sample_time:
        # the reference's per-token time embedding: e (dim) and e0 (6 dim) in fp32, plus the
        # (modulation + e0) sum each block builds
        per_token += 4 * (dim + 2 * 6 * dim)
    return per_token * tokens * batch


def held_state_bytes(tokens: int, dim: int = 5120, per_sample_time: bool = True) -> float:
    """What a paused pass holds between blocks under interleaved CFG: its fp32 residual stream
    (and, with the per-token time embedding, its fp32 e and e0)."""
    return tokens * 4 * (dim if per_sample_time else dim + 7 * dim)


def video_bytes(size: Sequence[int], frame_num: int) -> int:
    """One decoded fp32 video (3, F, H, W)."""
    return 3 * frame_num * size[0] * size[1] * 4


def vae_decode_bytes(size: Sequence[int], frame_num: int = 81,
                     chunk_peak_bytes: Optional[float] = None) -> float:
    """Peak of one VAE decode, weights excluded: a chunk's peak (`chunk_peak_bytes` when
    measured, else the per-pixel estimate) plus the output video held three times."""
    if chunk_peak_bytes is None:
        chunk_peak_bytes = VAE_DECODE_BYTES_PER_PIXEL * size[0] * size[1]
    return chunk_peak_bytes + 3 * video_bytes(size, frame_num)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertPlan:
    name: str
    placement: str  # RESIDENT | STREAMED
    cfg: str  # one of CFG_SCHEMES
    steps: int
    gpu_weight_bytes: int  # weights on the GPU through the loop (streamed: the non-block ones)
    slot_bytes: int  # streamed: the GPU block slots it holds while it runs (0 when resident)

    @property
    def resident(self) -> bool:
        return self.placement == RESIDENT


@dataclass
class MemoryPlan:
    fits: bool
    experts: Tuple[ExpertPlan, ...] = ()
    t5: str = 'cpu'  # one of T5_PLACEMENTS
    decode_leaves: Tuple[str, ...] = ()  # experts whose GPU weights leave before the decode
    # model name ('high_noise', 'low_noise', 't5', ...) -> one of HOST_PLACEMENTS
    host: Dict[str, str] = field(default_factory=dict)
    gpu_budget_bytes: int = 0
    host_budget_bytes: int = 0
    estimates_gib: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    error: Optional[str] = None  # why it does not fit (one line)
    device: str = 'cuda'  # 'cpu': a CPU run, nothing planned

    # -------------------------------------------------------------- queries
    def expert(self, name: str) -> ExpertPlan:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(f'no expert {name!r} in the plan; experts: '
                       f'{[e.name for e in self.experts]}')

    @property
    def resident(self) -> Tuple[str, ...]:
        return tuple(e.name for e in self.experts if e.resident)

    @property
    def streamed(self) -> Tuple[str, ...]:
        return tuple(e.name for e in self.experts if not e.resident)

    @property
    def all_resident(self) -> bool:
        return bool(self.experts) and all(e.resident for e in self.experts)

    @property
    def batched_cfg(self) -> bool:
        return bool(self.experts) and all(e.cfg == 'batched' for e in self.experts)

    @property
    def decode(self) -> str:
        return 'experts_leave' if self.decode_leaves else 'beside'

    # -------------------------------------------------------------- output
    def describe(self) -> str:
        """The plan in one line."""
        if not self.fits:
            return f'does not fit: {self.error}'
        if self.device == 'cpu':
            return 'CPU run: every model on the CPU, ' + _CFG_TEXT[self.experts[0].cfg]
        cfgs = {e.cfg for e in self.experts}
        parts = [', '.join(f'{e.name} {e.placement}' +
                           (f' ({e.cfg} CFG)' if len(cfgs) > 1 else '') for e in self.experts)]
        if len(cfgs) == 1:
            parts.append(_CFG_TEXT[cfgs.pop()])
        parts.append(_T5_TEXT[self.t5])
        if self.decode_leaves:
            verb = 'leaves' if len(self.decode_leaves) == 1 else 'leave'
            parts.append(f'decode after {" and ".join(self.decode_leaves)} {verb} the GPU')
        else:
            parts.append('decode beside the experts')
        host = {k: sorted(n for n, v in self.host.items() if v == k)
                for k in ('pinned', 'pageable', 'reload')}
        if any(host.values()):
            parts.append('host: ' + ', '.join(f'{k} {"+".join(v)}' for k, v in host.items() if v))
        est = self.estimates_gib
        parts.append(f'GPU peak ~{est["gpu_peak"]:.1f} of {self.gpu_budget_bytes / GiB:.1f} GiB, '
                     f'host ~{est["host_used"]:.1f} of {self.host_budget_bytes / GiB:.1f} GiB')
        return '; '.join(parts)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(describe=self.describe(), decode=self.decode, batched_cfg=self.batched_cfg)
        return d

    def raise_if_unfit(self) -> None:
        if not self.fits:
            raise PlacementError(self.error)


_CFG_TEXT = {'batched': 'batched CFG (batch 2)', 'sequential': 'sequential CFG (2 x batch 1)',
             'interleaved': 'interleaved CFG (2 x batch 1, block by block)',
             'parallel': 'CFG parallel (one pass per rank)'}
_T5_TEXT = {'gpu': 'T5 on GPU, resident', 'gpu_then_freed': 'T5 on GPU, freed after encoding',
            'streamed': 'T5 streamed', 'cpu': 'T5 on CPU'}


def log_plan(plan: MemoryPlan) -> None:
    logging.info('memory plan: %s', plan.describe())
    for note in plan.notes:
        logging.info('memory plan note: %s', note)


def cpu_plan(sizes: ModelSizes, want_batched_cfg: bool = False,
             cfg_parallel: bool = False) -> MemoryPlan:
    """The plan of a run on the CPU: everything stays where it is, nothing to budget."""
    cfg = 'parallel' if cfg_parallel else 'batched' if want_batched_cfg else 'sequential'
    return MemoryPlan(fits=True, experts=tuple(
        ExpertPlan(e.name, RESIDENT, cfg, e.steps, e.total_bytes, 0) for e in sizes.experts),
        t5='cpu', host={e.name: 'pageable' for e in sizes.experts} | {'t5': 'pageable'},
        device='cpu')


def _gib(nbytes: float) -> str:
    return f'{nbytes / GiB:.1f} GiB'


def plan_memory(gpu_bytes: float, host_bytes: float, size: Sequence[int], frame_num: int,
                sizes: Optional[ModelSizes] = None, *, want_batched_cfg: bool = False,
                want_resident: bool = True, t5_cpu: bool = False, t5_streaming: bool = True,
                per_sample_time: bool = True, cfg_parallel: bool = False,
                act_bytes_per_token: float = ACT_BYTES_PER_TOKEN_A14B,
                vae_decode_bytes_measured: Optional[float] = None,
                vae_stride: Sequence[int] = (4, 8, 8),
                patch_size: Sequence[int] = (1, 2, 2)) -> MemoryPlan:
    """Place the models of one generate() call.

    gpu_bytes: GPU memory the pipeline may use in total, its own weights already on the GPU
        included (usable_gpu_bytes() + the bytes of our models on the GPU).
    host_bytes: host memory available, our own models' host copies included.
    sizes: the models (default: t2v-A14B in bf16, ModelSizes.a14b()).
    want_batched_cfg: batch-2 CFG when it fits; want_resident=False streams every expert and
        frees T5 after encoding (the optimized meaning of offload_model=True); t5_cpu: encode
        on the CPU; t5_streaming: the pipeline can stream T5's blocks; per_sample_time: the
        optimized time embedding (False: the reference's per-token one, more activations);
        cfg_parallel: one CFG pass per rank.
    act_bytes_per_token: the activation constant (see ACT_BYTES_PER_TOKEN_A14B);
    vae_decode_bytes_measured: a measured decode peak (weights excluded) instead of the
        per-pixel estimate.
    """
    sizes = sizes or ModelSizes.a14b()
    w, h = size
    tokens = tokens_for(size, frame_num, vae_stride, patch_size)
    gpu_budget = int(gpu_bytes - GPU_MARGIN_BYTES)
    host_budget = int(host_bytes - HOST_MARGIN_BYTES)
    what = f'{w}*{h} x {frame_num} frames'
    budget_text = (f'the GPU budget is {_gib(gpu_budget)} ({_gib(gpu_bytes)} usable minus a '
                   f'{_gib(GPU_MARGIN_BYTES)} margin)')

    def act(batch: int) -> float:
        return activation_bytes(tokens, batch, sizes.dim, sizes.ffn_dim, per_sample_time,
                                act_bytes_per_token)

    act_by_cfg = {'batched': act(2), 'sequential': act(1), 'parallel': act(1),
                  'interleaved': act(1) + held_state_bytes(tokens, sizes.dim, per_sample_time)}
    decode = vae_decode_bytes(size, frame_num) if vae_decode_bytes_measured is None else \
        vae_decode_bytes_measured
    t5_encode_whole = sizes.t5_bytes + T5_ENCODE_BYTES
    t5_encode_streamed = sizes.t5_non_block_bytes + STREAM_SLOTS * sizes.t5_block_bytes + \
        T5_ENCODE_BYTES
    est: Dict[str, float] = {
        'tokens': tokens, 'gpu_budget': gpu_budget / GiB, 'host_budget': host_budget / GiB,
        **{f'activations_{k}': v / GiB for k, v in act_by_cfg.items()},
        'vae_decode': decode / GiB, 'vae_weights': sizes.vae_bytes / GiB,
        't5': sizes.t5_bytes / GiB,
        **{f'expert_{e.name}': e.total_bytes / GiB for e in sizes.experts}}
    notes: List[str] = []

    def refuse(error: str) -> MemoryPlan:
        return MemoryPlan(fits=False, gpu_budget_bytes=gpu_budget, host_budget_bytes=host_budget,
                          estimates_gib=est, notes=notes, error=error)

    # ---- shortfalls no placement can cure
    if act_by_cfg['sequential'] > gpu_budget:
        return refuse(f'{what} needs ~{_gib(act_by_cfg["sequential"])} of activations (batch 1)'
                      f'; {budget_text}: use a smaller size or fewer frames, or several GPUs '
                      f'(torchrun --dit_fsdp --ulysses_size N)')
    if sizes.vae_bytes + decode > gpu_budget:
        return refuse(f'the VAE decode of {what} needs ~{_gib(decode + sizes.vae_bytes)} '
                      f'(weights included); {budget_text}: use a smaller size')

    experts = sizes.experts
    slot = {e.name: STREAM_SLOTS * e.block_bytes for e in experts}

    def gpu_weights(e: ExpertSize, streamed: frozenset) -> int:
        return e.non_block_bytes if e.name in streamed else e.total_bytes

    # ---- candidates, best first: fewest streamed experts, then the fewest streamed steps
    subsets = [frozenset(e.name for e in combo) for n in range(len(experts) + 1)
               for combo in itertools.combinations(experts, n)]
    if not want_resident:
        subsets = [frozenset(e.name for e in experts)]
    order = {e.name: i for i, e in enumerate(experts)}
    steps = {e.name: e.steps for e in experts}
    subsets.sort(key=lambda s: (len(s), sum(steps[n] for n in s),
                                sorted((-order[n] for n in s))))

    def cfg_options(streamed: frozenset) -> List[Dict[str, str]]:
        if cfg_parallel:
            return [{e.name: 'parallel' for e in experts}]
        options = [{e.name: 'batched' for e in experts}] if want_batched_cfg else []
        options.append({e.name: 'interleaved' if e.name in streamed else 'sequential'
                        for e in experts})
        if streamed:  # last resort: a streamed block is copied twice per step
            options.append({e.name: 'sequential' for e in experts})
        return options

    gpu_short: Optional[Tuple[float, str]] = None  # the smallest GPU need seen, described
    host_short: Optional[str] = None
    for streamed in subsets:
        base = sizes.vae_bytes + sum(gpu_weights(e, streamed) for e in experts)
        pinned_experts = sum(e.total_bytes for e in experts if e.name in streamed)
        for cfg in cfg_options(streamed):
            phases = {e.name: base + (slot[e.name] if e.name in streamed else 0) +
                      act_by_cfg[cfg[e.name]] for e in experts}
            loop_peak = max(phases.values())
            if loop_peak > gpu_budget:
                if gpu_short is None or loop_peak < gpu_short[0]:
                    gpu_short = (loop_peak, _gpu_shortfall(what, budget_text, experts, streamed,
                                                           loop_peak, act_by_cfg, cfg))
                continue
            if pinned_experts > host_budget:
                if host_short is None:
                    names = ' and '.join(n for n in (e.name for e in experts) if n in streamed)
                    host_short = (f'streaming {names} needs {_gib(pinned_experts)} of '
                                  f'page-locked host memory; {_gib(host_budget)} is available '
                                  f'({_gib(host_bytes)} minus a {_gib(HOST_MARGIN_BYTES)} margin'
                                  f'): missing {_gib(pinned_experts - host_budget)}')
                continue
            host_free = host_budget - pinned_experts
            # decode without evictions (slots and activations are gone by then)
            decode_beside = base + decode
            t5 = _place_t5(sizes, gpu_budget, host_free, base, loop_peak, decode_beside,
                           t5_encode_whole, t5_encode_streamed, want_resident, t5_cpu,
                           t5_streaming)
            if t5 is None:
                if host_short is None:
                    left = f'the {_gib(max(host_free, 0))} of host memory left'
                    host_short = (f'T5 ({_gib(sizes.t5_bytes)}) on the CPU (t5_cpu) does not '
                                  f'fit in {left}' if t5_cpu else
                                  f'T5 ({_gib(sizes.t5_bytes)}) fits neither on the GPU beside '
                                  f'the experts nor in {left}')
                continue
            t5_place, t5_host = t5
            return _finish(sizes, streamed, cfg, t5_place, t5_host, base, decode, gpu_budget,
                           host_budget, host_free, loop_peak, phases, t5_encode_whole,
                           t5_encode_streamed, est, notes)
    if host_short is not None:
        return refuse(host_short)
    assert gpu_short is not None
    return refuse(gpu_short[1])


def _gpu_shortfall(what: str, budget_text: str, experts: Sequence[ExpertSize],
                   streamed: frozenset, loop_peak: float, act_by_cfg: Dict[str, float],
                   cfg: Dict[str, str]) -> str:
    acts = max(act_by_cfg[c] for c in cfg.values())
    how = ('every expert streamed' if len(streamed) == len(experts) else
           f'{" and ".join(sorted(streamed)) or "no expert"} streamed')
    return (f'even with {how}, {what} needs ~{_gib(loop_peak)} on the GPU (activations '
            f'{_gib(acts)}, weights and block slots {_gib(loop_peak - acts)}); {budget_text}: '
            f'use a smaller size or fewer frames, or several GPUs (torchrun --dit_fsdp '
            f'--ulysses_size N)')


def _place_t5(sizes: ModelSizes, gpu_budget: int, host_free: int, base: int, loop_peak: float,
              decode_beside: float, encode_whole: int, encode_streamed: int, want_resident: bool,
              t5_cpu: bool, t5_streaming: bool) -> Optional[Tuple[str, str]]:
    """T5's (placement, host placement), best first, or None when it has no room anywhere."""
    t5 = sizes.t5_bytes
    host_ok = t5 <= host_free
    if t5_cpu:
        return ('cpu', 'pageable') if host_ok else None
    whole = base + encode_whole <= gpu_budget
    if (want_resident and whole and loop_peak + t5 <= gpu_budget and
            decode_beside + t5 <= gpu_budget):
        return 'gpu', 'none'
    if whole and host_ok:
        return 'gpu_then_freed', 'pinned'
    if t5_streaming and host_ok and base + encode_streamed <= gpu_budget:
        return 'streamed', 'pinned'
    if whole:
        return 'gpu_then_freed', 'reload'
    if host_ok:
        return 'cpu', 'pageable'
    return None


def _finish(sizes: ModelSizes, streamed: frozenset, cfg: Dict[str, str], t5_place: str,
            t5_host: str, base: int, decode: float, gpu_budget: int, host_budget: int,
            host_free: int, loop_peak: float, phases: Dict[str, float], encode_whole: int,
            encode_streamed: int, est: Dict[str, float], notes: List[str]) -> MemoryPlan:
    experts = sizes.experts
    weights = {e.name: e.non_block_bytes if e.name in streamed else e.total_bytes
               for e in experts}
    host = {e.name: 'pinned' if e.name in streamed else 'none' for e in experts}
    host['t5'] = t5_host
    if t5_host in ('pinned', 'pageable'):
        host_free -= sizes.t5_bytes

    # the decode: evict what costs least to bring back until it fits (streamed experts' GPU
    # weights have a page-locked host copy; then the resident experts, fewest steps first)
    t5_gpu = sizes.t5_bytes if t5_place == 'gpu' else 0
    need = base + decode + t5_gpu
    order = {e.name: i for i, e in enumerate(experts)}
    evict_order = sorted(experts, key=lambda e: (e.name not in streamed, e.steps,
                                                 -order[e.name]))
    leaves: List[ExpertSize] = []
    for e in evict_order:
        if need <= gpu_budget:
            break
        leaves.append(e)
        need -= weights[e.name]
    for e in list(leaves):  # keep what turned out not to be needed (cheapest first)
        if need + weights[e.name] <= gpu_budget:
            leaves.remove(e)
            need += weights[e.name]
    for e in leaves:
        if e.name in streamed:
            continue  # its host copy is the page-locked one it streams from
        if e.total_bytes <= host_free:
            host[e.name] = 'pinned'
            host_free -= e.total_bytes
        else:
            host[e.name] = 'reload'
            notes.append(f'no host room for {e.name} during the decode: it is freed and read '
                         f'again from the checkpoint by the next generate()')
    if t5_host == 'reload':
        notes.append('no host room for T5: it is freed after encoding and read again from the '
                     'checkpoint by the next generate()')
    if any(cfg[n] == 'sequential' for n in streamed):
        notes.append('interleaved CFG does not fit: streamed blocks are copied twice per step')
    plans = tuple(ExpertPlan(e.name, STREAMED if e.name in streamed else RESIDENT, cfg[e.name],
                             e.steps, weights[e.name],
                             STREAM_SLOTS * e.block_bytes if e.name in streamed else 0)
                  for e in experts)
    encode = base + {'gpu': encode_whole, 'gpu_then_freed': encode_whole,
                     'streamed': encode_streamed, 'cpu': 0}[t5_place]
    pinned = sum(e.total_bytes for e in experts if host[e.name] == 'pinned') + \
        (sizes.t5_bytes if t5_host == 'pinned' else 0)
    pageable = sizes.t5_bytes if t5_host == 'pageable' else 0
    est.update({f'loop_{n}': v / GiB for n, v in phases.items()})
    est.update(loop_peak=(loop_peak + t5_gpu) / GiB, t5_encode_peak=encode / GiB,
               decode_peak=need / GiB, gpu_peak=max(loop_peak + t5_gpu, encode, need) / GiB,
               host_pinned=pinned / GiB, host_pageable=pageable / GiB,
               host_used=(pinned + pageable) / GiB)
    return MemoryPlan(fits=True, experts=plans, t5=t5_place,
                      decode_leaves=tuple(e.name for e in leaves),
                      host=host, gpu_budget_bytes=gpu_budget, host_budget_bytes=host_budget,
                      estimates_gib=est, notes=notes)
