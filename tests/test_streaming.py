"""Block streaming computes exactly what the resident model computes (tiny config, CPU: the
same copies and slot views as on a GPU, without the side stream)."""
from __future__ import annotations

import pytest
import torch

from wan.modules.model import WanModel
from wan.utils.block_streaming import StreamingBlockRunner, make_place, stream_blocks
from wan.utils.dtype_policy import dtype_rule
from wan.utils.random_init import build_on_meta

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=3, text_dim=32)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn(16, 2, 4, 4, generator=g)]
    return lat, torch.tensor([700]), [torch.randn(5, 32, generator=g)], \
        [torch.randn(9, 32, generator=g)]


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='the side-stream copies need a GPU'))])
def test_streaming_equals_resident_bit_for_bit_with_cfg_interleaving(device):
    resident = WanModel.from_random(seed=1, device=device, **TINY)
    streamed = WanModel.from_random(seed=1, device=device, **TINY)
    runner = stream_blocks(streamed, device)
    lat, t, ctx, ctx_null = (u.to(device) if torch.is_tensor(u) else [v.to(device) for v in u]
                             for u in inputs())
    if device == 'cuda':
        assert runner._arena.pinned
    with torch.no_grad():
        cond = resident(lat, t, ctx, seq_len=8)[0]
        uncond = resident(lat, t, ctx_null, seq_len=8)[0]
        s_cond, s_uncond = streamed.forward_passes([(lat, t, ctx), (lat, t, ctx_null)], 8)
        again = streamed(lat, t, ctx, seq_len=8)[0]
    assert torch.equal(s_cond[0], cond) and torch.equal(s_uncond[0], uncond)
    assert torch.equal(again, cond)
    # between calls the blocks' parameters are the host copies (the real weights), not slots
    slot_ptrs = {s.data_ptr() for s in runner.slots.buffers}
    for p in streamed.blocks.parameters():
        assert runner.host.data_ptr() <= p.data_ptr() < runner.host.data_ptr() + \
            runner.host.numel()
    assert not slot_ptrs & {p.data_ptr() for p in streamed.blocks.parameters()}
    for (n, a), (_, b) in zip(resident.state_dict().items(), streamed.state_dict().items()):
        assert torch.equal(a, b), n


def test_loading_straight_into_the_host_buffer(tmp_path):
    src = WanModel.from_random(seed=2, **TINY)
    src.save_pretrained(str(tmp_path))
    rule = dtype_rule(WanModel, 'matmul', torch.bfloat16)
    box = {}

    def before_load(model):
        for name, t in list(model.named_parameters()):
            t.data = t.data.to(rule(name, t))  # meta tensors in their final dtypes
        box['runner'] = StreamingBlockRunner(model.blocks, 'cpu')

    def place(name, tensor):
        return make_place(box['runner'], 'cpu')(name, tensor)

    model = WanModel.from_pretrained(str(tmp_path), dtype_rule=rule, before_load=before_load,
                                     place=place)
    model.block_runner = box['runner']
    host = box['runner'].host
    for p in model.blocks.parameters():
        assert host.data_ptr() <= p.data_ptr() < host.data_ptr() + host.numel()
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    ref = WanModel.from_pretrained(str(tmp_path), dtype_rule=rule)
    lat, t, ctx, _ = inputs(3)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(model(lat, t, ctx, seq_len=8)[0], ref(lat, t, ctx, seq_len=8)[0])


def test_blocks_must_share_one_layout():
    model = build_on_meta(lambda: WanModel(**TINY))
    model.blocks[1].ffn[0].weight.data = model.blocks[1].ffn[0].weight.data.to(torch.bfloat16)
    with pytest.raises(ValueError, match='block 1 differs in layout'):
        StreamingBlockRunner(model.blocks, 'cpu')


def test_pipeline_streams_and_unstreams_as_planned_bit_for_bit(tiny_cfg, monkeypatch):
    """The optimized pipeline follows a plan that streams both experts (interleaved CFG, one
    shared slot pair), then one that keeps them resident: every video equals the resident
    one bit for bit (CPU: the same copies and slot views as on a GPU)."""
    import copy
    from dataclasses import replace

    from easydict import EasyDict

    from wan.text2video_optimized import WanT2VOptimized
    from wan.utils.memory_plan import ModelSizes, cpu_plan
    from wan.optimizations import OptimizationConfig

    cfg = EasyDict(copy.deepcopy(dict(tiny_cfg)))
    cfg.param_dtype = torch.float32
    pipe = WanT2VOptimized(cfg, None, random_init=True, device='cpu',
                           optimizations=replace(OptimizationConfig.conservative(),
                                                 per_sample_time=True))
    monkeypatch.setattr(WanT2VOptimized, 'plans_placement', property(lambda self: True))
    base = cpu_plan(ModelSizes.a14b())

    def plan(placement, cfg_scheme):
        return replace(base, experts=tuple(replace(e, placement=placement, cfg=cfg_scheme)
                                           for e in base.experts), t5='cpu')

    kw = dict(size=(128, 64), frame_num=5, shift=12.0, sampling_steps=4,
              guide_scale=(3.0, 4.0), seed=5, offload_model=False)
    videos = []
    for placement, scheme in [('resident', 'sequential'), ('streamed', 'interleaved'),
                              ('resident', 'sequential')]:
        monkeypatch.setattr(pipe, 'plan_for', lambda *a, _p=plan(placement, scheme), **k: _p)
        videos.append(pipe.generate('a boat', **kw))
        streamed = sorted(pipe._streaming)
        assert streamed == ([] if placement == 'resident' else ['high_noise', 'low_noise'])
        if placement == 'streamed':
            runners = list(pipe._streaming.values())
            assert runners[0].slots is runners[1].slots  # one slot pair for both experts
    assert torch.equal(videos[1], videos[0]) and torch.equal(videos[2], videos[0])
    assert pipe._slots.buffers is None  # nothing streams any more: the slots are released


def test_t5_reload_placement_frees_and_reads_it_again(tiny_cfg, monkeypatch):
    """A plan with no host room for T5 ('reload'): its weights are dropped after encoding
    and read again for the next new prompt; the videos are those of a pipeline that kept it."""
    from dataclasses import replace

    from wan.optimizations import OptimizationConfig
    from wan.text2video_optimized import WanT2VOptimized
    from wan.utils.memory_plan import ModelSizes, cpu_plan

    def build():
        return WanT2VOptimized(tiny_cfg, None, random_init=True, device='cpu',
                               optimizations=replace(OptimizationConfig.conservative(),
                                                     prompt_cache=True))
    kw = dict(size=(128, 64), frame_num=5, shift=12.0, sampling_steps=2, guide_scale=4.0,
              seed=3)
    kept = build()
    want = [kept.generate('a cat', **kw), kept.generate('a dog', **kw)]
    pipe = build()
    monkeypatch.setattr(WanT2VOptimized, 'plans_placement', property(lambda self: True))
    plan = cpu_plan(ModelSizes.a14b())
    plan = replace(plan, host=dict(plan.host, t5='reload'))
    monkeypatch.setattr(pipe, 'plan_for', lambda *a, **k: plan)
    got = pipe.generate('a cat', **kw)
    assert pipe._t5_freed and pipe.text_encoder.model.token_embedding.weight.is_meta
    assert pipe._our_bytes()[1] < kept._our_bytes()[1]  # its host bytes are gone
    got = [got, pipe.generate('a dog', **kw)]  # 'a dog' is new: T5 is read again
    assert all(torch.equal(a, b) for a, b in zip(got, want))
