"""The memory planner over GPU and host memory, the GPU cap and host-memory helpers, and the
page-locked host arena (all on the CPU: GPUs are simulated by their byte counts)."""
from __future__ import annotations

import gc
import json
import logging
import math
import os

import pytest
import torch

from wan.utils.host_memory import ALIGNMENT, HostArena, plan_host_layout
from wan.utils.memory_plan import (GPU_MARGIN_BYTES, HOST_MARGIN_BYTES, STREAM_SLOTS, GiB,
                                   ExpertSize, ModelSizes, PlacementError, activation_bytes,
                                   cpu_plan, log_plan, plan_memory, tokens_for)
from wan.utils.placement import (apply_gpu_cap, cgroup_headroom_bytes, usable_gpu_bytes,
                                 usable_host_bytes)

P480, P720 = (832, 480), (1280, 720)
KiB = 1024
ACT_TODAY = 232 * KiB  # the measured constant at the time of writing
ACT_TARGET = 83 * KiB  # the activation target of the placement issue (<= 6 GiB at 720p)

# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------


def test_a14b_sizes_match_the_modules():
    """The A14B size formulas equal the bytes of the real modules (built on meta, in bf16 as
    with --convert_model_dtype; the VAE in fp32), and the default step split is the default
    schedule's."""
    from wan.modules.model import WanModel
    from wan.modules.t5 import umt5_xxl
    from wan.modules.vae2_1 import _video_vae
    from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler
    from wan.utils.random_init import build_on_meta

    expert = build_on_meta(lambda: WanModel(dim=5120, ffn_dim=13824, num_heads=40,
                                            num_layers=40)).to(torch.bfloat16)
    t5 = build_on_meta(lambda: umt5_xxl(encoder_only=True, return_tokenizer=False,
                                        dtype=torch.bfloat16, device='meta'))
    vae = build_on_meta(_video_vae)
    measured = ModelSizes.from_modules([('high_noise', expert, 26), ('low_noise', expert, 14)],
                                       t5, vae)
    assert measured == ModelSizes.a14b()
    a14b = ModelSizes.a14b()
    assert math.isclose(a14b.experts[0].total_bytes / GiB, 26.6, abs_tol=0.05)
    assert math.isclose(a14b.t5_bytes / GiB, 10.6, abs_tol=0.05)
    assert 0 < a14b.experts[0].non_block_bytes < a14b.experts[0].block_bytes

    sched = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
                                        use_dynamic_shifting=False)
    sched.set_timesteps(40, device='cpu', shift=12.0)
    high = int((sched.timesteps >= 0.875 * 1000).sum())
    assert tuple(e.steps for e in a14b.experts) == (high, 40 - high)


def test_tokens_and_activation_model():
    assert tokens_for(P720, 81) == 21 * 45 * 80
    assert tokens_for(P480, 81) == 21 * 30 * 52
    t = tokens_for(P720, 81)
    # linear in tokens and batch, one named constant per token
    assert activation_bytes(t, 2, bytes_per_token=ACT_TARGET) == \
        2 * activation_bytes(t, 1, bytes_per_token=ACT_TARGET)
    assert activation_bytes(t, 1, bytes_per_token=ACT_TARGET) == t * ACT_TARGET
    assert activation_bytes(t, 1, bytes_per_token=ACT_TARGET) / GiB <= 6.0
    # the reference's per-token time embedding costs more
    assert activation_bytes(t, 1, per_sample_time=False) > activation_bytes(t, 1)


# ---------------------------------------------------------------------------------------------
# the planner: GPUs of 141..16 GB x hosts of 64/128/256 GB x 480p/720p (81 frames)
# ---------------------------------------------------------------------------------------------

CFG_SHORT = {'batched': 'bat', 'sequential': 'seq', 'interleaved': 'int', 'parallel': 'par'}


def key(plan) -> str:
    """The plan's decisions, compactly: experts (R resident / S streamed, run order high then
    low), CFG per expert, T5 placement:host placement, decode (beside, or the experts that
    leave with their host placement)."""
    if not plan.fits:
        e = plan.error
        return 'ERR ' + ('activations' if 'of activations' in e else 'vae' if 'VAE' in e else
                         'host' if 'host memory' in e else 'gpu')
    experts = ''.join('R' if e.resident else 'S' for e in plan.experts)
    cfg = '/'.join(CFG_SHORT[e.cfg] for e in plan.experts)
    decode = '+'.join(f'{n.split("_")[0]}:{plan.host[n]}' for n in plan.decode_leaves) or \
        'beside'
    return f'{experts} {cfg} {plan.t5}:{plan.host["t5"]} {decode}'


# How the expectations follow from the sizes (A14B in bf16, GiB): expert 26.61 (blocks
# 40 x 0.65, non-block 0.43), 2 block slots 1.31, VAE weights 0.47, T5 10.58 (non-block 1.96,
# 2 block slots 0.72, encode 0.5), margins GPU 3 / host 4: a GPU of N GiB has N - 3 to plan
# with (N is the --gpu_memory_gib cap that emulates it), a host of H GiB H - 4.
# Loop need per phase = weights on the GPU + the running expert's slots if streamed +
# activations (interleaved = batch 1 + one fp32 residual stream of 1.44 / 0.63 GiB).
# - 232 KiB/token: batch-1 activations 16.73 (720p) / 7.25 (480p). Both resident: 53.70 +
#   act = 70.4 / 60.9; one streamed: max(27.52 + act, 28.83 + act + held) = 47.0 / 36.7;
#   both streamed: 2.65 + act + held = 20.8 / 10.5.
# - 83 KiB/token: batch-1 activations 5.98 / 2.59: both resident 59.7 / 56.3; one streamed
#   36.3 / 32.0; both streamed 10.1 / 5.9.
# T5 stays on the GPU when it fits beside the loop and the decode (VAE 20.2 / 8.75 at
# 720p / 480p, plus weights), else encodes there (base + 11.08) and is freed to pinned host
# memory, or to nothing ('reload') when the host is full (64 GiB host, both experts pinned:
# 53.2 + 10.6 > 60); it streams when it cannot fit whole (one expert resident on 40).
# The decode evicts what is needed: at 720p on 48/40 with one expert resident the resident
# one (27.5 + 20.7 > 45), on 24 both streamed experts' non-block weights (21.5 > 21).
# 720p on 16: activations alone (16.7) exceed 13 GiB with today's constant; with the target
# constant the VAE decode (20.7) does.
RR_SEQ, RS, SS = 'RR seq/seq', 'RS seq/int', 'SS int/int'
PLANS = {
    # (activation constant, size, GPU GiB): expected key for hosts of (64, 128, 256) GiB
    (ACT_TODAY, P480, 141): [f'{RR_SEQ} gpu:none beside'] * 3,
    (ACT_TODAY, P480, 80): [f'{RR_SEQ} gpu:none beside'] * 3,
    (ACT_TODAY, P480, 48): [f'{RS} gpu_then_freed:pinned beside'] * 3,
    (ACT_TODAY, P480, 40): [f'{RS} streamed:pinned beside'] * 3,
    (ACT_TODAY, P480, 32): [f'{SS} gpu:none beside'] * 3,
    (ACT_TODAY, P480, 24): [f'{SS} gpu_then_freed:reload beside'] +
                           [f'{SS} gpu_then_freed:pinned beside'] * 2,
    (ACT_TODAY, P480, 16): [f'{SS} gpu_then_freed:reload beside'] +
                           [f'{SS} gpu_then_freed:pinned beside'] * 2,
    (ACT_TODAY, P720, 141): [f'{RR_SEQ} gpu:none beside'] * 3,
    (ACT_TODAY, P720, 80): [f'{RR_SEQ} gpu_then_freed:pinned beside'] * 3,
    (ACT_TODAY, P720, 48): [f'{SS} gpu:none beside'] * 3,
    (ACT_TODAY, P720, 40): [f'{SS} gpu:none beside'] * 3,
    (ACT_TODAY, P720, 32): [f'{SS} gpu_then_freed:reload beside'] +
                           [f'{SS} gpu_then_freed:pinned beside'] * 2,
    (ACT_TODAY, P720, 24): [f'{SS} gpu_then_freed:reload low:pinned+high:pinned'] +
                           [f'{SS} gpu_then_freed:pinned low:pinned+high:pinned'] * 2,
    (ACT_TODAY, P720, 16): ['ERR activations'] * 3,
    (ACT_TARGET, P480, 141): [f'{RR_SEQ} gpu:none beside'] * 3,
    (ACT_TARGET, P480, 80): [f'{RR_SEQ} gpu:none beside'] * 3,
    (ACT_TARGET, P480, 48): [f'{RS} gpu_then_freed:pinned beside'] * 3,
    (ACT_TARGET, P480, 40): [f'{RS} streamed:pinned beside'] * 3,
    (ACT_TARGET, P480, 32): [f'{SS} gpu:none beside'] * 3,
    (ACT_TARGET, P480, 24): [f'{SS} gpu:none beside'] * 3,
    (ACT_TARGET, P480, 16): [f'{SS} gpu_then_freed:reload beside'] +
                            [f'{SS} gpu_then_freed:pinned beside'] * 2,
    (ACT_TARGET, P720, 141): [f'{RR_SEQ} gpu:none beside'] * 3,
    (ACT_TARGET, P720, 80): [f'{RR_SEQ} gpu_then_freed:pinned beside'] * 3,
    (ACT_TARGET, P720, 48): [f'{RS} gpu_then_freed:pinned high:reload'] +
                            [f'{RS} gpu_then_freed:pinned high:pinned'] * 2,
    (ACT_TARGET, P720, 40): [f'{RS} streamed:pinned high:reload'] +
                            [f'{RS} streamed:pinned high:pinned'] * 2,
    (ACT_TARGET, P720, 32): [f'{SS} gpu_then_freed:reload beside'] +
                            [f'{SS} gpu_then_freed:pinned beside'] * 2,
    (ACT_TARGET, P720, 24): [f'{SS} gpu_then_freed:reload low:pinned+high:pinned'] +
                            [f'{SS} gpu_then_freed:pinned low:pinned+high:pinned'] * 2,
    (ACT_TARGET, P720, 16): ['ERR vae'] * 3,
}


@pytest.mark.parametrize('act,size,gpu', list(PLANS), ids=[
    f'{a // KiB}KiB-{s[0]}x{s[1]}-{g}GB' for a, s, g in PLANS])
def test_plan_table(act, size, gpu):
    # the VAE decode pinned to the estimate the table was derived with (20.2 GiB at 720p)
    vae = 20.2 * GiB / (1280 * 720) * size[0] * size[1]
    got = [key(plan_memory(gpu * GiB, host * GiB, size, 81, act_bytes_per_token=act,
                           vae_decode_bytes_measured=vae))
           for host in (64, 128, 256)]
    assert got == PLANS[(act, size, gpu)]


@pytest.mark.parametrize('act', [ACT_TODAY, ACT_TARGET], ids=['today', 'target'])
@pytest.mark.parametrize('gpu', [141, 80, 48, 40, 32, 24, 16])
@pytest.mark.parametrize('size', [P480, P720], ids=['480p', '720p'])
def test_plans_stay_within_both_budgets(size, gpu, act):
    """Every fitting plan's estimated phases fit its GPU budget, its host placements fit the
    host budget, and a streamed expert's host copy is page-locked."""
    sizes = ModelSizes.a14b()
    for host in (64, 128, 256):
        p = plan_memory(gpu * GiB, host * GiB, size, 81, act_bytes_per_token=act)
        if not p.fits:
            continue
        est = p.estimates_gib
        assert p.gpu_budget_bytes == gpu * GiB - GPU_MARGIN_BYTES
        assert p.host_budget_bytes == host * GiB - HOST_MARGIN_BYTES
        for phase in ('loop_peak', 't5_encode_peak', 'decode_peak'):
            assert est[phase] <= p.gpu_budget_bytes / GiB + 1e-9, phase
        assert est['gpu_peak'] == max(est['loop_peak'], est['t5_encode_peak'],
                                      est['decode_peak'])
        assert est['host_used'] <= p.host_budget_bytes / GiB + 1e-9
        for e, size_e in zip(p.experts, sizes.experts):
            if not e.resident:
                assert p.host[e.name] == 'pinned' and e.slot_bytes == \
                    STREAM_SLOTS * size_e.block_bytes
                assert e.gpu_weight_bytes == size_e.non_block_bytes
            else:
                assert e.gpu_weight_bytes == size_e.total_bytes and e.slot_bytes == 0


def test_error_messages_name_the_shortfall():
    p = plan_memory(16 * GiB, 128 * GiB, P720, 81, act_bytes_per_token=ACT_TODAY)
    assert not p.fits and p.error.startswith('1280*720 x 81 frames needs ~16.7 GiB of '
                                             'activations (batch 1); the GPU budget is 13.0 GiB')
    assert p.describe() == f'does not fit: {p.error}'
    with pytest.raises(PlacementError, match='of activations'):
        p.raise_if_unfit()
    p = plan_memory(16 * GiB, 128 * GiB, P720, 81, act_bytes_per_token=ACT_TARGET)
    # 15.7 GiB chunk peak + the fp32 video three times (2.6 GiB) + the VAE weights (0.5 GiB)
    assert 'VAE decode of 1280*720 x 81 frames needs ~18.7 GiB' in p.error
    # activations fit, the smallest streaming plan does not (measured VAE peak: 1 GiB)
    p = plan_memory(21 * GiB, 128 * GiB, P720, 81, act_bytes_per_token=ACT_TODAY,
                    vae_decode_bytes_measured=GiB)
    assert not p.fits and p.error.startswith('even with every expert streamed, 1280*720 x 81 '
                                             'frames needs ~19.4 GiB on the GPU')
    # the host cannot hold the experts that must stream: how much is missing
    p = plan_memory(24 * GiB, 40 * GiB, P480, 81)
    assert not p.fits and key(p) == 'ERR host'
    assert 'streaming high_noise and low_noise needs 53.2 GiB of page-locked host memory; ' \
           '36.0 GiB is available' in p.error and 'missing 17.2 GiB' in p.error
    # ... while a GPU with room for one expert needs only the other one on the host
    p = plan_memory(48 * GiB, 40 * GiB, P480, 81)
    assert key(p) == f'{RS} gpu_then_freed:reload beside'
    assert any('T5' in n and 'read again' in n for n in p.notes)
    # T5 on the CPU by request, but no host room for it
    p = plan_memory(141 * GiB, 8 * GiB, P480, 81, t5_cpu=True)
    assert not p.fits and p.error.startswith('T5 (10.6 GiB) on the CPU (t5_cpu) does not fit')


def _rank(p):
    """Better plans rank higher: fits, fewer streamed experts (then fewer streamed steps), CFG
    (batched > one copy per step > blocks copied twice), T5 placement, fewer evictions before
    the decode, fewer models that must be read again from disk."""
    if not p.fits:
        return (False,)
    streamed = [e for e in p.experts if not e.resident]
    cfg = 2 if p.batched_cfg else 0 if any(e.cfg == 'sequential' for e in streamed) else 1
    t5 = ['cpu:pageable', 'gpu_then_freed:reload', 'streamed:pinned', 'gpu_then_freed:pinned',
          'gpu:none'].index(f'{p.t5}:{p.host["t5"]}')
    return (True, -len(streamed), -sum(e.steps for e in streamed), cfg, t5,
            -len(p.decode_leaves), -list(p.host.values()).count('reload'))


@pytest.mark.parametrize('act', [ACT_TODAY, ACT_TARGET], ids=['today', 'target'])
@pytest.mark.parametrize('host', [64, 128])
@pytest.mark.parametrize('size', [P480, P720, (720, 1280)])
@pytest.mark.parametrize('wishes', [{}, dict(want_batched_cfg=True), dict(t5_cpu=True),
                                    dict(want_resident=False), dict(per_sample_time=False)],
                         ids=['default', 'batched', 't5_cpu', 'no_resident', 'per_token_time'])
def test_plan_monotone_in_gpu_budget(size, host, wishes, act):
    budgets = [g / 4 for g in range(8 * 4, 200 * 4)]
    plans = [plan_memory(g * GiB, host * GiB, size, 81, act_bytes_per_token=act, **wishes)
             for g in budgets]
    ranks = [_rank(p) for p in plans]
    for i in range(1, len(ranks)):
        assert ranks[i] >= ranks[i - 1], \
            f'{budgets[i]} GiB gives a lesser plan than {budgets[i - 1]} GiB: ' \
            f'{plans[i].describe()} < {plans[i - 1].describe()}'
    assert not plans[0].fits and plans[-1].fits
    if not wishes.get('want_resident', True):
        assert plans[-1].streamed == ('high_noise', 'low_noise')
    else:
        assert plans[-1].all_resident


@pytest.mark.parametrize('size', [P480, P720], ids=['480p', '720p'])
def test_plan_monotone_in_host(size):
    for gpu in (16, 24, 40, 48, 80):
        ranks = [_rank(plan_memory(gpu * GiB, h * GiB, size, 81, act_bytes_per_token=ACT_TARGET))
                 for h in range(8, 200, 2)]
        assert ranks == sorted(ranks), gpu


@pytest.mark.parametrize('steps,resident', [((26, 14), 'high_noise'), ((10, 30), 'low_noise'),
                                            ((20, 20), 'high_noise')])
def test_the_expert_with_more_steps_stays_resident(steps, resident):
    sizes = ModelSizes.a14b(steps=steps)
    p = plan_memory(40 * GiB, 128 * GiB, P480, 81, sizes)
    assert p.resident == (resident,)
    streamed = p.streamed[0]
    assert p.expert(streamed).cfg == 'interleaved' and p.expert(resident).cfg == 'sequential'
    assert p.host[streamed] == 'pinned' and p.host[resident] == 'none'
    d = p.describe()
    assert f'{resident} resident (sequential CFG)' in d and \
        f'{streamed} streamed (interleaved CFG)' in d


def test_the_larger_expert_streams_when_only_it_frees_enough():
    """Unequal experts: when streaming the one with fewer steps does not free enough, the
    other one streams."""
    big, small = ExpertSize('high_noise', 40 * GiB, GiB, 39, 26), \
        ExpertSize('low_noise', 20 * GiB, GiB // 2, 39, 14)
    a = ModelSizes.a14b()
    sizes = ModelSizes((big, small), a.t5_bytes, a.t5_block_bytes, a.t5_num_blocks, a.vae_bytes)
    p = plan_memory(40 * GiB, 128 * GiB, P480, 81, sizes)
    assert p.resident == ('low_noise',) and p.streamed == ('high_noise',)
    p = plan_memory(60 * GiB, 128 * GiB, P480, 81, sizes)
    assert p.resident == ('high_noise',)


def test_wishes():
    a = dict(gpu_bytes=141 * GiB, host_bytes=128 * GiB, frame_num=81)
    # batched CFG only when asked, and when it fits beside what is resident
    assert not plan_memory(size=P720, **a).batched_cfg
    p = plan_memory(size=P720, want_batched_cfg=True, **a)
    assert p.batched_cfg and p.all_resident and 'batched CFG (batch 2)' in p.describe()
    p = plan_memory(80 * GiB, 128 * GiB, P720, 81, want_batched_cfg=True,
                    act_bytes_per_token=ACT_TODAY)
    assert p.all_resident and not p.batched_cfg  # both resident beats batching
    p = plan_memory(24 * GiB, 128 * GiB, P480, 81, want_batched_cfg=True)
    assert p.streamed == ('high_noise', 'low_noise') and p.batched_cfg  # one copy per step
    # offload_model=True: everything streams, T5 does not stay on the GPU
    p = plan_memory(size=P480, want_resident=False, **a)
    assert key(p) == f'{SS} gpu_then_freed:pinned beside'
    # CFG parallelism: one pass per rank
    p = plan_memory(size=P480, cfg_parallel=True, want_batched_cfg=True, **a)
    assert [e.cfg for e in p.experts] == ['parallel'] * 2
    assert 'CFG parallel' in p.describe()
    # T5 on the CPU by request; without T5 streaming a T5 that cannot fit whole goes there too
    assert key(plan_memory(size=P480, t5_cpu=True, **a)) == f'{RR_SEQ} cpu:pageable beside'
    p = plan_memory(40 * GiB, 128 * GiB, P480, 81, t5_streaming=False)
    assert key(p) == f'{RS} cpu:pageable beside'
    # a measured VAE peak replaces the estimate
    p = plan_memory(80 * GiB, 128 * GiB, P720, 81, act_bytes_per_token=ACT_TARGET)
    assert p.t5 == 'gpu_then_freed'
    p = plan_memory(80 * GiB, 128 * GiB, P720, 81, act_bytes_per_token=ACT_TARGET,
                    vae_decode_bytes_measured=8 * GiB)
    assert p.t5 == 'gpu'


def test_copy_twice_is_the_last_resort():
    """When interleaved CFG's extra residual stream does not fit beside a streamed expert,
    sequential CFG (blocks copied twice per step) still runs, with a note."""
    t = tokens_for(P720, 81)
    act1 = activation_bytes(t, 1)
    a = ModelSizes.a14b()
    e = a.experts[0]
    seq_need = 2 * e.non_block_bytes + a.vae_bytes + STREAM_SLOTS * e.block_bytes + act1
    gpu = seq_need + GPU_MARGIN_BYTES + GiB // 8  # the interleaved need is 1.44 GiB more
    p = plan_memory(gpu, 128 * GiB, P720, 81, vae_decode_bytes_measured=GiB)
    assert p.fits and [x.cfg for x in p.experts] == ['sequential'] * 2
    assert any('copied twice' in n for n in p.notes)
    p = plan_memory(gpu + 2 * GiB, 128 * GiB, P720, 81, vae_decode_bytes_measured=GiB)
    assert [x.cfg for x in p.experts] == ['interleaved'] * 2 and not p.notes


def test_plan_output(caplog):
    p = plan_memory(48 * GiB, 64 * GiB, P720, 81, act_bytes_per_token=ACT_TARGET)
    d = p.as_dict()
    assert json.loads(json.dumps(d))['describe'] == p.describe()
    assert d['decode'] == 'experts_leave' and d['batched_cfg'] is False
    assert d['host'] == {'high_noise': 'reload', 'low_noise': 'pinned', 't5': 'pinned'}
    text = p.describe()
    assert '\n' not in text and text.startswith(
        'high_noise resident (sequential CFG), low_noise streamed (interleaved CFG); T5 on GPU, '
        'freed after encoding; decode after high_noise leaves the GPU; host: pinned '
        'low_noise+t5, reload high_noise; GPU peak ~38.6 of 45.0 GiB')
    with caplog.at_level(logging.INFO):
        log_plan(p)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f'memory plan: {text}'
    assert any('high_noise' in line and 'read again' in line for line in lines[1:])
    p.raise_if_unfit()  # fits: nothing raised


def test_cpu_plan():
    p = cpu_plan(ModelSizes.a14b(), want_batched_cfg=True)
    assert p.fits and p.all_resident and p.batched_cfg and p.t5 == 'cpu'
    assert p.describe() == 'CPU run: every model on the CPU, batched CFG (batch 2)'
    assert not cpu_plan(ModelSizes.a14b()).batched_cfg


# ---------------------------------------------------------------------------------------------
# the GPU cap (fake device)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    state = dict(free=30 * GiB, total=80 * GiB, reserved=12 * GiB, allocated=3 * GiB,
                 fractions=[])

    def mem_get_info(device=None):
        if state.get('broken'):
            raise AssertionError('CUDA touched')
        return state['free'], state['total']

    monkeypatch.setattr(torch.cuda, 'mem_get_info', mem_get_info)
    monkeypatch.setattr(torch.cuda, 'memory_reserved', lambda device=None: state['reserved'])
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: state['allocated'])
    monkeypatch.setattr(torch.cuda, 'set_per_process_memory_fraction',
                        lambda fraction, device=None: state['fractions'].append(
                            (fraction, device)))
    return state


def test_usable_gpu_bytes(fake_gpu):
    # free + reserved-but-unused blocks of the caching allocator
    assert usable_gpu_bytes('cuda:0') == 30 * GiB + 12 * GiB - 3 * GiB
    # a cap counts what this process already allocated
    assert usable_gpu_bytes('cuda:0', 24) == 24 * GiB - 3 * GiB
    assert usable_gpu_bytes('cuda:0', 60) == 39 * GiB  # the GPU's free memory is tighter
    fake_gpu['allocated'] = 30 * GiB
    assert usable_gpu_bytes('cuda:0', 24) == 0
    with pytest.raises(ValueError, match='gpu_memory_gib 81'):
        usable_gpu_bytes('cuda:0', 81)


def test_apply_gpu_cap(fake_gpu):
    assert apply_gpu_cap('cuda:0', None) is None and fake_gpu['fractions'] == []
    assert apply_gpu_cap('cuda:0', 24) == 24 / 80
    assert fake_gpu['fractions'] == [(24 / 80, torch.device('cuda:0'))]
    assert isinstance(fake_gpu['fractions'][0][0], float)
    with pytest.raises(ValueError, match=r'gpu_memory_gib 100 exceeds the 80.0 GiB of cuda:0; '
                                         r'valid: 0 < gpu_memory_gib <= 80.0'):
        apply_gpu_cap('cuda:0', 100)
    fake_gpu['broken'] = True  # a non-positive cap is refused before CUDA is touched
    for bad in (0, -4, float('nan')):
        with pytest.raises(ValueError, match='positive number of GiB'):
            apply_gpu_cap('cuda:0', bad)
    assert len(fake_gpu['fractions']) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_apply_gpu_cap_enforced_on_a_gpu():  # pragma: no cover - GPU only
    device = torch.device('cuda', torch.cuda.current_device())
    total = torch.cuda.mem_get_info(device)[1]
    try:
        apply_gpu_cap(device, 1.0)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(1.5 * GiB), dtype=torch.uint8, device=device)
        assert usable_gpu_bytes(device, 1.0) <= GiB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert total > GiB


# ---------------------------------------------------------------------------------------------
# host memory (fake /proc and cgroup files)
# ---------------------------------------------------------------------------------------------

def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


MEMINFO = 'MemTotal:       131072000 kB\nMemFree:         1000000 kB\n' \
          'MemAvailable:   100000000 kB\nBuffers:          200000 kB\nCached:         50000000 kB\n' \
          'HugePages_Total:       0\n'


def test_host_bytes_meminfo(tmp_path):
    _write(tmp_path / 'meminfo', MEMINFO)
    empty = tmp_path / 'cgroup'
    os.makedirs(empty)
    no_cgroup = dict(cgroup_root=str(empty), proc_cgroup=str(tmp_path / 'none'))
    assert usable_host_bytes(str(tmp_path / 'meminfo'), **no_cgroup) == 100000000 * 1024
    # an old kernel without MemAvailable: free + buffers + page cache
    _write(tmp_path / 'old', MEMINFO.replace('MemAvailable:   100000000 kB\n', ''))
    assert usable_host_bytes(str(tmp_path / 'old'), **no_cgroup) == \
        (1000000 + 200000 + 50000000) * 1024
    # no /proc at all: the free physical pages
    assert usable_host_bytes(str(tmp_path / 'missing'), **no_cgroup) > 0


def test_host_bytes_cgroup_v2(tmp_path):
    _write(tmp_path / 'meminfo', MEMINFO)
    root = tmp_path / 'cg'
    _write(root / 'cgroup.controllers', 'cpu memory\n')
    _write(root / 'a' / 'memory.max', f'{40 * GiB}\n')
    _write(root / 'a' / 'memory.current', f'{10 * GiB}\n')
    _write(root / 'a' / 'b' / 'memory.max', 'max\n')
    _write(root / 'a' / 'b' / 'memory.current', f'{9 * GiB}\n')
    _write(root / 'a' / 'b' / 'memory.stat', f'anon 1\ninactive_file {2 * GiB}\n')
    _write(tmp_path / 'self_cgroup', '0::/a/b\n')
    args = dict(cgroup_root=str(root), proc_cgroup=str(tmp_path / 'self_cgroup'))
    # the parent's limit binds: 40 - 10 GiB
    assert cgroup_headroom_bytes(**args) == 30 * GiB
    assert usable_host_bytes(str(tmp_path / 'meminfo'), **args) == 30 * GiB
    # a tighter own limit, page cache counted as reclaimable: 16 - (9 - 2) GiB
    _write(root / 'a' / 'b' / 'memory.max', f'{16 * GiB}\n')
    assert cgroup_headroom_bytes(**args) == 9 * GiB
    # no limit anywhere: MemAvailable
    _write(root / 'a' / 'memory.max', 'max\n')
    _write(root / 'a' / 'b' / 'memory.max', 'max\n')
    assert cgroup_headroom_bytes(**args) is None
    assert usable_host_bytes(str(tmp_path / 'meminfo'), **args) == 100000000 * 1024
    # a namespace that hides the path: the root's own files
    _write(tmp_path / 'self_cgroup', '0::/elsewhere\n')
    _write(root / 'memory.max', f'{8 * GiB}\n')
    _write(root / 'memory.current', f'{GiB}\n')
    assert cgroup_headroom_bytes(**args) == 7 * GiB


def test_host_bytes_cgroup_v1(tmp_path):
    _write(tmp_path / 'meminfo', MEMINFO)
    root = tmp_path / 'cg'
    mem = root / 'memory' / 'job'
    _write(mem / 'memory.limit_in_bytes', '9223372036854771712\n')  # v1's "unlimited"
    _write(mem / 'memory.usage_in_bytes', f'{5 * GiB}\n')
    _write(mem / 'memory.stat', f'cache 5\ntotal_inactive_file {GiB}\n'
                                f'hierarchical_memory_limit 9223372036854771712\n')
    _write(tmp_path / 'self_cgroup', '5:cpu,cpuacct:/\n4:memory:/job\n0::/\n')
    args = dict(cgroup_root=str(root), proc_cgroup=str(tmp_path / 'self_cgroup'))
    assert cgroup_headroom_bytes(**args) is None
    assert usable_host_bytes(str(tmp_path / 'meminfo'), **args) == 100000000 * 1024
    _write(mem / 'memory.stat', f'total_inactive_file {GiB}\n'
                                f'hierarchical_memory_limit {24 * GiB}\n')
    assert cgroup_headroom_bytes(**args) == 24 * GiB - (5 * GiB - GiB)
    _write(mem / 'memory.limit_in_bytes', f'{12 * GiB}\n')
    assert usable_host_bytes(str(tmp_path / 'meminfo'), **args) == 8 * GiB


def test_host_bytes_of_this_machine():
    n = usable_host_bytes()
    assert 0 < n <= os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


# ---------------------------------------------------------------------------------------------
# the host arena
# ---------------------------------------------------------------------------------------------

LAYOUT = {'a': ((3, 5), torch.bfloat16), 'b': ((7,), torch.float32),
          'c': ((2, 2, 3), torch.int64), 'd': ((0, 4), torch.float16), 'e': ((9,), torch.bool),
          'f': ((1,), torch.float64)}


def test_arena_carves_aligned_typed_views():
    nbytes = plan_host_layout(LAYOUT)
    assert nbytes == sum(-(-math.prod(s) * torch.empty((), dtype=d).element_size() // 256) * 256
                         for s, d in LAYOUT.values()) + ALIGNMENT
    for order in (list(LAYOUT), list(reversed(LAYOUT))):
        arena = HostArena(nbytes)
        assert not arena.pin() and not arena.pinned  # no CUDA here
        views = {}
        for name in order:
            shape, dtype = LAYOUT[name]
            t = arena.take(shape, dtype)
            assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
            assert t.data_ptr() % ALIGNMENT == 0 and t.device.type == 'cpu'
            views[name] = t
        assert arena.used <= nbytes and arena.free == nbytes - arena.used
        # the views do not overlap: each keeps what was written into it
        for i, (name, t) in enumerate(views.items()):
            t.fill_(i % 2 if t.dtype == torch.bool else i + 1)
        for i, (name, t) in enumerate(views.items()):
            if t.numel():
                assert (t == (i % 2 if t.dtype == torch.bool else i + 1)).all(), name
        # tight: at most the start-address slack and the last tensor's rounding are left
        assert arena.free < 2 * ALIGNMENT
        with pytest.raises(ValueError, match='plan_host_layout'):
            arena.take((arena.free + 1,), torch.uint8)
        arena.close()
        arena.close()  # idempotent


def test_arena_store_and_edges():
    src = torch.randn(4, 6)
    arena = HostArena(plan_host_layout({'x': (src.shape, src.dtype)}))
    out = arena.store(src)
    assert torch.equal(out, src) and out.data_ptr() != src.data_ptr()
    assert HostArena(0).take((0,), torch.float32).numel() == 0
    with pytest.raises(ValueError):
        HostArena(-1)
    with pytest.raises(ValueError):
        HostArena(16, alignment=48)
    assert 'pageable' in repr(arena)


class FakeCudart:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(('register', ptr, nbytes, flags))
        return 2 if self.fail else 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(('unregister', ptr))
        return 0


@pytest.fixture
def fake_cudart(monkeypatch):
    fake = FakeCudart()

    def check_error(res):
        if int(res) != 0:
            raise RuntimeError(f'CUDA error {int(res)}')

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'cudart', lambda: fake)
    monkeypatch.setattr(torch.cuda, 'check_error', check_error)
    return fake


def test_arena_registers_once_and_unregisters_once(fake_cudart):
    arena = HostArena(4096)
    view = arena.take((16,), torch.float32)
    view.fill_(3.0)  # filled first, page-locked afterwards
    assert not arena.pinned and fake_cudart.calls == []
    assert arena.pin() and arena.pinned and arena.pin()
    assert len(fake_cudart.calls) == 1
    op, ptr, nbytes, flags = fake_cudart.calls[0]
    assert (op, nbytes, flags) == ('register', 4096, 0) and ptr <= view.data_ptr() < ptr + 4096
    arena.close()
    arena.close()
    assert fake_cudart.calls[1:] == [('unregister', ptr)] and not arena.pinned
    assert not arena.pin() and len(fake_cudart.calls) == 2  # closed for good
    early = HostArena(64)
    early.close()
    assert not early.pin() and len(fake_cudart.calls) == 2
    assert (view == 3.0).all()  # the views outlive the registration
    # garbage collection unregisters a pinned arena nobody closed
    other = HostArena(1024)
    other.pin()
    other_ptr = fake_cudart.calls[-1][1]
    del other
    gc.collect()
    assert fake_cudart.calls[-1] == ('unregister', other_ptr)
    # unpinned and empty arenas never register nor unregister
    n = len(fake_cudart.calls)
    unpinned = HostArena(1024)
    assert not HostArena(0).pin()
    del unpinned
    gc.collect()
    assert len(fake_cudart.calls) == n


def test_arena_registration_failure_raises(fake_cudart):
    fake_cudart.fail = True
    arena = HostArena(4096)
    with pytest.raises(RuntimeError, match='CUDA error 2'):
        arena.pin()
    assert not arena.pinned


def test_arena_without_a_usable_cudart(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)

    def broken():
        raise AssertionError('Torch not compiled with CUDA enabled')

    monkeypatch.setattr(torch.cuda, 'cudart', broken)
    arena = HostArena(1024)
    assert not arena.pin() and not arena.pinned
    arena.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_arena_is_page_locked_on_a_gpu():  # pragma: no cover - GPU only
    arena = HostArena(plan_host_layout({'w': ((1024, 1024), torch.bfloat16)}))
    w = arena.take((1024, 1024), torch.bfloat16)
    w.copy_(torch.randn(1024, 1024).to(torch.bfloat16))
    assert not w.is_pinned() and arena.pin() and w.is_pinned()
    g = w.to('cuda', non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(g.cpu(), w)
    arena.close()
    assert not w.is_pinned()
