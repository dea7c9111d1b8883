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
    slot_ptrs = {s.data_ptr() for s in runner.slots}
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
