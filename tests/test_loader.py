"""The one loader's load-time hooks (rename, transform, dtype rule, place, before_load) and
the dtype policy declared on WanModel."""
from __future__ import annotations

import pytest
import torch

from wan.modules.model import WanModel
from wan.utils.checkpoint import CheckpointError, chain, load_tensors_
from wan.utils.dtype_policy import apply_dtype_policy_, dtype_rule, keeps_fp32
from wan.utils.random_init import build_on_meta

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)


def tiny(seed=0):
    return WanModel.from_random(seed=seed, **TINY)


def test_fp32_islands_are_the_declared_parts():
    model = build_on_meta(lambda: WanModel(**TINY))
    islands = {n for n, _ in model.named_parameters() if keeps_fp32(model, n)}
    assert 'time_embedding.0.weight' in islands and 'head.head.weight' in islands
    assert 'blocks.1.modulation' in islands and 'head.modulation' in islands
    assert 'blocks.0.self_attn.norm_q.weight' in islands and 'blocks.0.norm3.weight' in islands
    assert 'time_projection.1.bias' in islands
    matmul = {n for n, _ in model.named_parameters()} - islands
    # what is left is exactly the matmul/conv inputs run under autocast
    assert all(n.startswith(('patch_embedding.', 'text_embedding.')) or
               any(f'.{p}.' in n for p in ('self_attn.q', 'self_attn.k', 'self_attn.v',
                                           'self_attn.o', 'cross_attn.q', 'cross_attn.k',
                                           'cross_attn.v', 'cross_attn.o', 'ffn.0', 'ffn.2'))
               for n in matmul), sorted(matmul)
    assert 'blocks.0.ffn.2.bias' in matmul and 'patch_embedding.weight' in matmul


@pytest.mark.parametrize('mode,island,matmul', [('checkpoint', torch.float32, torch.float32),
                                                ('all', torch.bfloat16, torch.bfloat16),
                                                ('matmul', torch.float32, torch.bfloat16)])
def test_dtype_modes(mode, island, matmul):
    model = tiny()
    n = apply_dtype_policy_(model, mode, torch.bfloat16)
    assert model.time_projection[1].weight.dtype == island
    assert model.blocks[0].ffn[0].weight.dtype == matmul
    assert (n == 0) == (mode == 'checkpoint')
    with pytest.raises(ValueError, match='unknown dtype mode'):
        dtype_rule(model, 'half', torch.bfloat16)


def test_matmul_mode_never_upcasts_an_island():
    model = tiny()
    model.to(torch.bfloat16)  # e.g. a bf16/fp16 checkpoint file
    apply_dtype_policy_(model, 'matmul', torch.bfloat16)
    assert model.blocks[0].self_attn.norm_q.weight.dtype == torch.bfloat16


def test_loading_with_a_rule_equals_converting_after(tmp_path):
    src = tiny(seed=1)
    src.save_pretrained(str(tmp_path))
    rule = dtype_rule(WanModel, 'matmul', torch.bfloat16)
    loaded = WanModel.from_pretrained(str(tmp_path), dtype_rule=rule)
    apply_dtype_policy_(src, 'matmul', torch.bfloat16)
    for (n, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n


def test_rename_transform_place_and_before_load(tmp_path):
    src = tiny(seed=2)
    sd = {f'model.diffusion_model.{k}': v.clone() for k, v in src.state_dict().items()}
    sd['scaled_fp8'] = torch.zeros(0)
    target = build_on_meta(lambda: WanModel(**TINY))

    def rename(name):
        return None if name == 'scaled_fp8' else name.removeprefix('model.diffusion_model.')

    def double_head(stream):
        for name, t in stream:
            yield name, (t * 2 if name == 'head.head.weight' else t)

    placed = []

    def place(name, t):
        placed.append(name)
        return t.clone()

    load_tensors_(target, sd.items(), source='mem', rename=rename,
                  transform=chain(None, double_head), place=place,
                  expected_names=list(sd))
    assert torch.equal(target.head.head.weight, 2 * src.head.head.weight)
    assert torch.equal(target.blocks[1].ffn[2].weight, src.blocks[1].ffn[2].weight)
    assert len(placed) == len(src.state_dict())
    # before_load edits the meta model: a renamed checkpoint tensor then has no home
    src.save_pretrained(str(tmp_path))

    def drop_bias(model):
        model.head.head.bias = None

    with pytest.raises(CheckpointError, match='unexpected tensors: 1 \\(head.head.bias'):
        WanModel.from_pretrained(str(tmp_path), before_load=drop_bias)


def test_expected_names_are_checked_in_model_naming_before_reading():
    target = build_on_meta(lambda: WanModel(**TINY))

    def never():
        raise AssertionError('no tensor may be read before the names are checked')
        yield

    with pytest.raises(CheckpointError, match='missing tensors'):
        load_tensors_(target, never(), source='idx', expected_names=['x.head.head.weight'],
                      rename=lambda n: n.removeprefix('x.'))
