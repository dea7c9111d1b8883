"""LoRA files (wan/utils/lora.py): every key family merges to the hand-computed weights (CPU)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from wan.modules.model import WanModel
from wan.utils.checkpoint import CheckpointError, load_tensors_, module_tensor_shapes
from wan.utils.lora import (LoraSpec, load_lora, lora_merge_transform, merge_loras_,
                            parse_lora_arg)
from wan.utils.random_init import build_on_meta

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
RANK = 4

# the modules each test LoRA touches: (our module, diffusers module, musubi module)
LOWRANK = [('blocks.0.self_attn.q', 'blocks.0.attn1.to_q', 'blocks_0_self_attn_q'),
           ('blocks.1.cross_attn.o', 'blocks.1.attn2.to_out.0', 'blocks_1_cross_attn_o'),
           ('blocks.1.ffn.0', 'blocks.1.ffn.net.0.proj', 'blocks_1_ffn_0'),
           ('head.head', 'proj_out', 'head_head')]
DIFFS = [('blocks.0.norm3', 'blocks.0.norm2', 'blocks_0_norm3'),                 # norm weight
         ('blocks.1.self_attn.norm_q', 'blocks.1.attn1.norm_q', 'blocks_1_self_attn_norm_q'),
         ('blocks.0.modulation', 'blocks.0.scale_shift_table', 'blocks_0_modulation')]  # bare
DIFF_BS = [('blocks.0.self_attn.q', 'blocks.0.attn1.to_q', 'blocks_0_self_attn_q'),
           ('blocks.0.norm3', 'blocks.0.norm2', 'blocks_0_norm3')]


@pytest.fixture(scope='module')
def model_sd():
    return {k: v.clone() for k, v in WanModel.from_random(seed=1, **TINY).state_dict().items()}


def random_pieces(model_sd, seed, alpha):
    """Low-rank pairs, full deltas and bias deltas with our names, and the expected merge
    delta per tensor in float64 (W + scale * up @ down, scale = alpha / rank or 1)."""
    g = torch.Generator().manual_seed(seed)
    pieces, expected = {}, {}
    scale = alpha / RANK if alpha is not None else 1.0
    for ours, _, _ in LOWRANK:
        w = model_sd[f'{ours}.weight']
        up = torch.randn(w.shape[0], RANK, generator=g) * 0.1
        down = torch.randn(RANK, w.shape[1], generator=g) * 0.1
        pieces[ours] = {'up': up, 'down': down}
        expected[f'{ours}.weight'] = scale * (up.double() @ down.double())
    for ours, _, _ in DIFFS:
        name = f'{ours}.weight' if f'{ours}.weight' in model_sd else ours
        d = torch.randn(model_sd[name].shape, generator=g) * 0.1
        pieces.setdefault(ours, {})['diff'] = d
        expected[name] = d.double()
    for ours, _, _ in DIFF_BS:
        d = torch.randn(model_sd[f'{ours}.bias'].shape, generator=g) * 0.1
        pieces.setdefault(ours, {})['diff_b'] = d
        expected[f'{ours}.bias'] = d.double()
    return pieces, expected


def key_names(family):
    """(our module) -> how the family spells its module, and the suffix of each role."""
    index = {'A': 0, "A'": 0, 'B': 2, 'C': 1}[family]
    modules = {row[0]: row[index] for row in LOWRANK + DIFFS + DIFF_BS}
    prefix = {'A': 'diffusion_model.', "A'": 'diffusion_model.', 'B': 'lora_unet_',
              'C': 'transformer.'}[family]
    roles = {'up': '.lora_up.weight', 'down': '.lora_down.weight', 'alpha': '.alpha',
             'diff': '.diff', 'diff_b': '.diff_b'}
    if family in ("A'", 'C'):
        roles.update(up='.lora_B.weight', down='.lora_A.weight')
    if family == 'C':
        roles['diff_b'] = '.lora_B.bias'
    return modules, prefix, roles


def write_lora(path, pieces, family, alpha=None, metadata=None):
    modules, prefix, roles = key_names(family)
    sd = {}
    for ours, parts in pieces.items():
        for role, t in parts.items():
            if family == 'C' and role == 'diff':
                continue  # diffusers files have no full deltas
            sd[prefix + modules.get(ours, ours) + roles[role]] = t.contiguous()
        if alpha is not None and 'up' in parts:
            sd[prefix + modules.get(ours, ours) + roles['alpha']] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata=metadata)
    return path


def stream_merge(model_sd, loras):
    """Load model_sd into a meta-built model through the LoRA transform."""
    model = build_on_meta(lambda: WanModel(**TINY))
    transform = lora_merge_transform(loras, module_tensor_shapes(model))
    load_tensors_(model, transform(iter(model_sd.items())), source='test')
    return model.state_dict()


def check_merge(got, model_sd, expected, strength=1.0, skip=()):
    changed = 0
    for name, w in model_sd.items():
        if name in expected and name not in skip:
            want = (w.double() + strength * expected[name]).float()
            torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6)
            changed += not torch.equal(got[name], w)
        else:
            assert torch.equal(got[name], w), name
    return changed


@pytest.mark.parametrize('family,alpha', [('A', 2.0), ("A'", None), ('B', 8.0), ('C', None)])
def test_each_key_family_merges_as_computed_by_hand(tmp_path, model_sd, family, alpha):
    pieces, expected = random_pieces(model_sd, seed=0, alpha=alpha)
    path = write_lora(tmp_path / 'l.safetensors', pieces, family, alpha)
    lora = load_lora(LoraSpec(str(path), 1.0))
    assert lora.family == family
    skip = {f'{o}.weight' if f'{o}.weight' in model_sd else o for o, _, _ in DIFFS} \
        if family == 'C' else set()
    got = stream_merge(model_sd, [lora])
    assert check_merge(got, model_sd, expected, skip=skip) == len(expected) - len(skip)
    # the same on an already loaded model
    model = WanModel.from_random(seed=1, **TINY)
    merge_loras_(model, [lora])
    for k, v in model.state_dict().items():
        assert torch.equal(v, got[k]), k


def test_diffusers_lora_alpha_from_adapter_metadata(tmp_path, model_sd):
    pieces, expected = random_pieces(model_sd, seed=2, alpha=None)
    meta = {'lora_adapter_metadata': json.dumps({'transformer.r': RANK,
                                                 'transformer.lora_alpha': 2 * RANK})}
    lora = load_lora(str(write_lora(tmp_path / 'c.safetensors', pieces, 'C', metadata=meta)))
    got = stream_merge(model_sd, [lora])
    name = 'blocks.0.self_attn.q.weight'
    torch.testing.assert_close(got[name], (model_sd[name].double() + 2 * expected[name]).float(),
                               rtol=1e-6, atol=1e-6)
    bias = 'blocks.0.self_attn.q.bias'  # lora_B.bias is scaled like lora_B
    torch.testing.assert_close(got[bias], (model_sd[bias].double() + 2 * expected[bias]).float(),
                               rtol=1e-6, atol=1e-6)


def test_strength_scales_and_zero_is_the_identity(tmp_path, model_sd):
    pieces, expected = random_pieces(model_sd, seed=3, alpha=4.0)
    path = str(write_lora(tmp_path / 'l.safetensors', pieces, 'A', alpha=4.0))
    got = stream_merge(model_sd, [load_lora(LoraSpec(path, 0.0))])
    for k, v in model_sd.items():
        assert torch.equal(got[k], v), k
    got = stream_merge(model_sd, [load_lora(LoraSpec(path, -0.5))])
    check_merge(got, model_sd, expected, strength=-0.5)


def test_two_loras_add(tmp_path, model_sd):
    p1, e1 = random_pieces(model_sd, seed=4, alpha=2.0)
    p2, e2 = random_pieces(model_sd, seed=5, alpha=None)
    l1 = load_lora(str(write_lora(tmp_path / 'a.safetensors', p1, 'A', alpha=2.0)))
    l2 = load_lora(LoraSpec(str(write_lora(tmp_path / 'b.safetensors', p2, 'B')), 0.7))
    both = stream_merge(model_sd, [l1, l2])
    expected = {k: e1.get(k, 0) + 0.7 * e2.get(k, 0) for k in set(e1) | set(e2)}
    check_merge(both, model_sd, expected)
    # one after the other gives the same bits (fp32 weights: no rounding in between)
    model = WanModel.from_random(seed=1, **TINY)
    merge_loras_(merge_loras_(model, [l1]), [l2])
    for k, v in model.state_dict().items():
        assert torch.equal(v, both[k]), k


def test_merge_rounds_once_to_the_stored_dtype(tmp_path, model_sd):
    pieces, expected = random_pieces(model_sd, seed=6, alpha=None)
    lora = load_lora(str(write_lora(tmp_path / 'l.safetensors', pieces, "A'")))
    bf16 = {k: v.to(torch.bfloat16) for k, v in model_sd.items()}
    got = dict(lora_merge_transform([lora], module_tensor_shapes(
        build_on_meta(lambda: WanModel(**TINY))))(iter(bf16.items())))
    name = 'blocks.1.ffn.0.weight'
    pieces_q = pieces['blocks.1.ffn.0']
    want = (bf16[name].float() + pieces_q['up'] @ pieces_q['down']).to(torch.bfloat16)
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], want)


def test_conv_lora_on_the_patch_embedding(tmp_path, model_sd):
    w = model_sd['patch_embedding.weight']  # (64, 16, 1, 2, 2)
    up, down = torch.randn(64, RANK, 1, 1, 1), torch.randn(RANK, 16, 1, 2, 2)
    save_file({'diffusion_model.patch_embedding.lora_up.weight': up,
               'diffusion_model.patch_embedding.lora_down.weight': down},
              str(tmp_path / 'c.safetensors'))
    got = stream_merge(model_sd, [load_lora(str(tmp_path / 'c.safetensors'))])
    want = w.double() + torch.einsum('or,rikl->oikl', up[:, :, 0, 0, 0].double(),
                                     down[:, :, 0].double()).unsqueeze(2)
    torch.testing.assert_close(got['patch_embedding.weight'], want.float(), rtol=1e-6, atol=1e-6)


def test_unmatched_keys_are_listed_with_counts(tmp_path, model_sd):
    pieces, _ = random_pieces(model_sd, seed=7, alpha=1.0)
    q = pieces['blocks.0.self_attn.q']
    pieces['blocks.7.self_attn.q'] = {'up': q['up'].clone(), 'down': q['down'].clone()}
    path = write_lora(tmp_path / 'l.safetensors', pieces, 'A', alpha=1.0)
    lora = load_lora(str(path))
    with pytest.raises(CheckpointError) as err:
        lora_merge_transform([lora], module_tensor_shapes(build_on_meta(lambda: WanModel(**TINY))))
    msg = str(err.value)
    assert f'3 of {lora.num_keys} keys match no model tensor' in msg
    assert 'diffusion_model.blocks.7.self_attn.q.alpha' in msg
    assert 'diffusion_model.blocks.7.self_attn.q.lora_down.weight' in msg
    assert str(path) in msg
    with pytest.raises(CheckpointError, match='match no model tensor'):
        merge_loras_(WanModel.from_random(seed=1, **TINY), [lora])


def test_wrong_shapes_and_missing_targets_raise(tmp_path, model_sd):
    save_file({'diffusion_model.blocks.0.self_attn.q.lora_up.weight': torch.randn(32, RANK),
               'diffusion_model.blocks.0.self_attn.q.lora_down.weight': torch.randn(RANK, 64)},
              str(tmp_path / 'w.safetensors'))
    lora = load_lora(str(tmp_path / 'w.safetensors'))
    shapes = module_tensor_shapes(build_on_meta(lambda: WanModel(**TINY)))
    with pytest.raises(CheckpointError, match=r'blocks.0.self_attn.q.weight has shape \(32, 64\)'):
        lora_merge_transform([lora], shapes)
    # names only (no shapes): the shape is checked when the tensor comes by
    transform = lora_merge_transform([lora], list(shapes))
    with pytest.raises(CheckpointError, match='shape'):
        list(transform(iter(model_sd.items())))
    # a target that never comes in the stream
    pieces, _ = random_pieces(model_sd, seed=8, alpha=None)
    ok = load_lora(str(write_lora(tmp_path / 'ok.safetensors', pieces, "A'")))
    transform = lora_merge_transform([ok], shapes)
    partial = ((k, v) for k, v in model_sd.items() if k != 'head.head.weight')
    with pytest.raises(CheckpointError, match='head.head.weight'):
        list(transform(partial))


@pytest.mark.parametrize('keys,match', [
    ({'lora_te_text_model_encoder_layers_0_q.lora_down.weight': torch.zeros(1, 1)},
     'no Wan DiT LoRA keys'),
    ({'diffusion_model.blocks.0.self_attn.q.hada_w1_a': torch.zeros(1, 1)}, 'unsupported kind'),
    ({'diffusion_model.blocks.0.self_attn.q.lora_down.weight': torch.zeros(1, 64),
      'diffusion_model.blocks.0.self_attn.q.lora_up.weight': torch.zeros(64, 1),
      'lora_unet_blocks_0_self_attn_k.lora_down.weight': torch.zeros(1, 64),
      'lora_unet_blocks_0_self_attn_k.lora_up.weight': torch.zeros(64, 1)}, 'mixes key families'),
    ({'diffusion_model.blocks.0.self_attn.q.lora_down.weight': torch.zeros(1, 64)},
     'no matching up/down'),
    ({'diffusion_model.blocks.0.self_attn.q.lora_down.weight': torch.zeros(2, 64),
      'diffusion_model.blocks.0.self_attn.q.lora_up.weight': torch.zeros(64, 3)},
     'no low-rank pair'),
])
def test_malformed_files_are_refused(tmp_path, keys, match):
    save_file(keys, str(tmp_path / 'bad.safetensors'))
    with pytest.raises(CheckpointError, match=match):
        load_lora(str(tmp_path / 'bad.safetensors'))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.safetensors'):
        load_lora(str(tmp_path / 'nope.safetensors'))


def test_merging_into_fp8_weights_is_refused(tmp_path, model_sd):
    pieces, _ = random_pieces(model_sd, seed=9, alpha=None)
    lora = load_lora(str(write_lora(tmp_path / 'l.safetensors', pieces, "A'")))
    transform = lora_merge_transform([lora], list(model_sd))
    fp8 = ((k, v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in model_sd.items())
    with pytest.raises(CheckpointError, match='dequantized'):
        list(transform(fp8))


@pytest.mark.parametrize('arg,path,strength', [
    ('lora.safetensors', 'lora.safetensors', 1.0),
    ('lora.safetensors:0.5', 'lora.safetensors', 0.5),
    ('dir/l.safetensors:-1', 'dir/l.safetensors', -1.0),
    ('lora.safetensors:1e-1', 'lora.safetensors', 0.1),
    (r'C:\loras\x.safetensors', r'C:\loras\x.safetensors', 1.0),
    (r'C:\loras\x.safetensors:0.8', r'C:\loras\x.safetensors', 0.8),
    ('D:/loras/x.safetensors', 'D:/loras/x.safetensors', 1.0),
    ('/data/a:b/x.safetensors', '/data/a:b/x.safetensors', 1.0),
])
def test_parse_lora_arg(arg, path, strength):
    assert parse_lora_arg(arg) == LoraSpec(path, strength)


@pytest.mark.parametrize('arg', ['', ':0.5', 'lora.safetensors:', 'lora.safetensors:nan',
                                 'lora.safetensors:inf'])
def test_parse_lora_arg_errors(arg):
    with pytest.raises(ValueError):
        parse_lora_arg(arg)
