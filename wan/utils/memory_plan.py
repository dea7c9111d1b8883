"""Memory planner of the optimized pipeline: what stays on the GPU, and how CFG runs.

From the free GPU memory, the video size and frame count, it decides:
- whether both experts stay resident (no CPU<->GPU swaps in the denoising loop), or one at a
  time is moved in (the reference's swap), or the run cannot fit at all;
- whether CFG runs as one batch-2 forward or as two batch-1 forwards;
- whether T5 encodes on the GPU (moved back to the CPU afterwards when the experts need the
  room) or on the CPU;
- whether the experts must leave the GPU before the VAE decode.

The activation model is linear in the token count. Its constants come from peaks measured on
an H100 with the optimized forward (bench/results, see OPTIMIZATION_ANALYSIS.md) plus a
safety margin; they are deliberately conservative: a plan that does not fit falls back to
the next cheaper one, never to an OOM where the reference path would run.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

GiB = 2**30

# Peak activation bytes per token and per batch element of the optimized DiT forward
# (dim 5120, ffn 13824), scaled with dim and ffn_dim for other widths. Measured on the H100
# (peak minus the two bf16 experts' 53.2 GiB): ~222 KiB at 1280*720 batch 1
# (bench/results/h100_1280x720_both_e5722e6.json) and ~225 KiB at 832*480 batch 2
# (h100_832x480_both_f26bcfb.json); rounded up.
ACT_BYTES_PER_TOKEN_A14B = 232 * 1024
# Wan2.1 VAE decode peak per output pixel per frame-chunk (fp32), from the reference
# measurements 9.0 GiB at 832x480 and 20.2 GiB at 1280x720 (81 frames).
VAE_BYTES_PER_PIXEL = 20.2 * GiB / (1280 * 720)
T5_XXL_BYTES = 11.36e9
# allocator fragmentation, CUDA context, cuBLAS workspaces, compile buffers
MARGIN_BYTES = 3 * GiB


@dataclass
class MemoryPlan:
    fits: bool
    experts_resident: bool  # both experts on the GPU for the whole loop
    batched_cfg: bool  # cond + uncond in one batch-2 forward
    t5_on_gpu: bool  # encode on the GPU
    t5_offload_after_encode: bool  # move T5 back to the CPU after encoding
    offload_experts_before_decode: bool
    budget_gib: float
    estimates_gib: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.fits:
            return 'does not fit: ' + '; '.join(self.notes)
        parts = ['both experts resident' if self.experts_resident else
                 'one expert on the GPU at a time (swapped at the boundary)',
                 'batched CFG (batch 2)' if self.batched_cfg else 'sequential CFG (2 x batch 1)',
                 ('T5 on GPU' + (', freed after encoding' if self.t5_offload_after_encode
                                 else ', resident')) if self.t5_on_gpu else 'T5 on CPU']
        if self.offload_experts_before_decode:
            parts.append('experts leave the GPU before VAE decode')
        return '; '.join(parts) + f' (budget {self.budget_gib:.1f} GiB)'

    def as_dict(self) -> dict:
        return asdict(self)


def dit_param_count(dim: int, ffn_dim: int, num_layers: int, freq_dim: int = 256,
                    text_dim: int = 4096, in_dim: int = 16, out_dim: int = 16) -> int:
    block = 8 * (dim * dim + dim) + 2 * dim * ffn_dim + ffn_dim + dim + 4 * dim + 2 * dim \
        + 6 * dim
    non_block = (in_dim * 4 * dim + dim) + (text_dim * dim + dim) + (dim * dim + dim) + \
        (freq_dim * dim + dim) + (dim * dim + dim) + (dim * 6 * dim + 6 * dim) + 2 * dim + \
        (dim * 4 * out_dim + 4 * out_dim)
    return num_layers * block + non_block


def tokens_for(size, frame_num: int, vae_stride=(4, 8, 8), patch=(1, 2, 2)) -> int:
    w, h = size
    t = (frame_num - 1) // vae_stride[0] + 1
    return t * (h // vae_stride[1] // patch[1]) * (w // vae_stride[2] // patch[2])


def activation_bytes(tokens: int, batch: int, dim: int = 5120, ffn_dim: int = 13824,
                     per_token_time: bool = False) -> float:
    scale = (dim * 26 + ffn_dim * 4) / (5120 * 26 + 13824 * 4)
    per_token = ACT_BYTES_PER_TOKEN_A14B * scale
    if per_token_time:
        # the reference's per-token time embedding: e (dim) and e0 (6 dim) in fp32, plus the
        # (modulation + e0) sum each block builds
        per_token += 4 * (dim + 2 * 6 * dim)
    return per_token * tokens * batch


def vae_decode_bytes(size) -> float:
    return VAE_BYTES_PER_PIXEL * size[0] * size[1]


def plan_memory(free_bytes: float, size, frame_num: int, *, dim: int = 5120,
                ffn_dim: int = 13824, num_layers: int = 40, expert_bytes: Optional[float] = None,
                t5_bytes: float = T5_XXL_BYTES, t5_cpu: bool = False,
                want_batched_cfg: bool = True, want_resident: bool = True,
                per_token_time: bool = False) -> MemoryPlan:
    """Decide placements for one generate() call given `free_bytes` of GPU memory.

    `free_bytes` is what the pipeline may use in total (weights included). `expert_bytes`
    defaults to a bf16 A14B-shaped expert of the given widths.
    """
    if expert_bytes is None:
        expert_bytes = 2 * dit_param_count(dim, ffn_dim, num_layers)
    tokens = tokens_for(size, frame_num)
    act1 = activation_bytes(tokens, 1, dim, ffn_dim, per_token_time)
    act2 = activation_bytes(tokens, 2, dim, ffn_dim, per_token_time)
    vae = vae_decode_bytes(size)
    budget = free_bytes - MARGIN_BYTES
    est = {'expert': expert_bytes / GiB, 'activations_batch1': act1 / GiB,
           'activations_batch2': act2 / GiB, 'vae_decode': vae / GiB, 't5': t5_bytes / GiB,
           'tokens': tokens}
    notes: List[str] = []

    def plan(**kw) -> MemoryPlan:
        return MemoryPlan(budget_gib=budget / GiB, estimates_gib=est, notes=notes, **kw)

    resident_options = [True, False] if want_resident else [False]
    cfg_options = [True, False] if want_batched_cfg else [False]
    for resident in resident_options:
        weights = expert_bytes * (2 if resident else 1)
        for batched in cfg_options:
            need = weights + (act2 if batched else act1)
            if need > budget:
                continue
            # T5 encodes on the GPU when it fits beside the weights; it stays there only if
            # the loop and the VAE decode still fit with it.
            t5_on_gpu = not t5_cpu and t5_bytes + weights <= budget
            if not t5_cpu and not t5_on_gpu:
                notes.append('T5 does not fit beside the experts: encoding on the CPU')
            t5_offload = t5_on_gpu and t5_bytes + max(need, weights + vae) > budget
            offload_before_decode = weights + vae > budget
            return plan(fits=True, experts_resident=resident, batched_cfg=batched,
                        t5_on_gpu=t5_on_gpu, t5_offload_after_encode=t5_offload,
                        offload_experts_before_decode=offload_before_decode)
    notes.append(f'one bf16 expert ({expert_bytes / GiB:.1f} GiB) plus batch-1 activations '
                 f'({act1 / GiB:.1f} GiB) exceed the budget of {budget / GiB:.1f} GiB; use '
                 f'several GPUs (torchrun --dit_fsdp --ulysses_size N) or a smaller size')
    return plan(fits=False, experts_resident=False, batched_cfg=False, t5_on_gpu=False,
                t5_offload_after_encode=False, offload_experts_before_decode=True)


def log_plan(plan: MemoryPlan) -> None:
    logging.info('memory plan: %s', plan.describe())
    for note in plan.notes:
        logging.info('memory plan note: %s', note)


def _self_check() -> None:  # pragma: no cover - documentation of the constants
    assert dit_param_count(5120, 13824, 40) == 14_288_491_584
    assert math.isclose(tokens_for((1280, 720), 81), 75_600)
