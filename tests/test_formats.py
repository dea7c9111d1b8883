"""Checkpoint layouts (wan/utils/formats.py): the original, Diffusers and ComfyUI files of the
same tiny weights load to the same tensors; name maps agree with diffusers/transformers (CPU)."""
import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from wan.modules.model import ForwardOptions, WanModel
from wan.modules.t5 import T5Encoder
from wan.modules.vae2_1 import Wan2_1_VAE, _video_vae
from wan.utils.checkpoint import CheckpointError, load_tensors_, module_tensor_shapes
from wan.utils.formats import (DIT_DIFFUSERS_NAMES, T5_HF_NAMES, VAE_DIFFUSERS_NAMES,
                               ComponentSource, detect_layout, fp8_transform)
from wan.utils.random_init import build_on_meta, init_random_weights_

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
TINY_T5 = dict(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
               num_buckets=32)
E4M3 = torch.float8_e4m3fn


def external_names():
    with open(os.path.join(HERE, 'data', 'external_names.json')) as f:
        return json.load(f)


def hooked(tensors, rename=None, transform=None):
    """What load_tensors_'s rename/transform hooks do to a stream."""
    if rename is not None:
        tensors = ((new, t) for name, t in tensors for new in [rename(name)] if new is not None)
    return transform(tensors) if transform is not None else tensors


def load_source(source: ComponentSource, factory, **transform_kw):
    model = build_on_meta(factory)
    stream = hooked(source.iter_tensors(), source.rename, source.transform(**transform_kw))
    load_tensors_(model, stream, source=source.path)
    return model.state_dict()


def dit_factory():
    return WanModel(**TINY_DIT)


def t5_factory():
    return T5Encoder(**TINY_T5)


def vae_factory():
    return _video_vae(dim=8)


@pytest.fixture(scope='module')
def weights():
    """One tiny set of weights for every component (high/low experts differ)."""
    t5 = init_random_weights_(build_on_meta(t5_factory), seed=5)
    return {
        'high': WanModel.from_random(seed=3, **TINY_DIT).state_dict(),
        'low': WanModel.from_random(seed=4, **TINY_DIT).state_dict(),
        't5': t5.state_dict(),
        'vae': Wan2_1_VAE(vae_pth=None, device='cpu', dim=8, random_init_seed=1).model.state_dict(),
    }


def contiguous(sd):
    return {k: v.detach().contiguous() for k, v in sd.items()}


def quantize(w):
    """Per-tensor fp8 (e4m3) with an fp32 scale, the way ComfyUI's fp8_scaled files store it."""
    scale = (w.abs().max().float() / 448.0).clamp(min=1e-12)
    return (w.float() / scale).to(E4M3), scale.reshape(())


def dequantized(sd, dtype=torch.bfloat16):
    """What a scaled-fp8 file of `sd` must load to: the 2-D block weights dequantized."""
    out = {}
    for k, v in sd.items():
        if is_quantized(k, v):
            q, s = quantize(v)
            out[k] = (q.float() * s).to(dtype)
        else:
            out[k] = v
    return out


def is_quantized(name, t):
    return name.startswith('blocks.') and name.endswith('.weight') and t.dim() == 2


def write_comfy_dit(path, sd, variant):
    """ComfyUI single file: our names under model.diffusion_model., fp16 or scaled fp8."""
    p = 'model.diffusion_model.'
    out = {}
    if variant == 'fp16':
        out = {p + k: v.half() for k, v in sd.items()}
    else:
        for k, v in sd.items():
            if not is_quantized(k, v):
                out[p + k] = v
                continue
            layer = k[:-len('.weight')]
            q, s = quantize(v)
            out[p + k] = q
            if variant == 'fp8_scaled':      # older files: scale_weight + scaled_fp8 marker
                out[p + layer + '.scale_weight'] = s
                out[p + layer + '.scale_input'] = torch.ones(())
            else:                            # newer files: weight_scale + comfy_quant JSON
                out[p + layer + '.weight_scale'] = s
                out[p + layer + '.comfy_quant'] = torch.tensor(
                    list(json.dumps({'format': 'float8_e4m3fn'}).encode()), dtype=torch.uint8)
        if variant == 'fp8_scaled':
            out[p + 'scaled_fp8'] = torch.empty(0, dtype=E4M3)
    save_file(contiguous(out), str(path))


def write_tokenizer_dir(path):
    os.makedirs(path, exist_ok=True)  # detection only checks the folder exists


def write_original(root, w):
    from wan.utils.checkpoint import save_sharded_safetensors
    for sub, key in (('high_noise_model', 'high'), ('low_noise_model', 'low')):
        m = build_on_meta(dit_factory)
        save_sharded_safetensors(contiguous(w[key]), str(root / sub), max_shard_bytes=300_000)
        (root / sub / 'config.json').write_text(json.dumps(m.config_dict()))
    torch.save(w['t5'], root / 'models_t5_umt5-xxl-enc-bf16.pth')
    torch.save(w['vae'], root / 'Wan2.1_VAE.pth')
    write_tokenizer_dir(root / 'google' / 'umt5-xxl')


def write_diffusers(root, w):
    ext = external_names()
    for sub, key in (('transformer', 'high'), ('transformer_2', 'low')):
        sd = {DIT_DIFFUSERS_NAMES.to_theirs(k): v for k, v in w[key].items()}
        folder = root / sub
        folder.mkdir()
        names = sorted(sd)  # two shards + index, as the release
        shards = {'diffusion_pytorch_model-00001-of-00002.safetensors': names[:30],
                  'diffusion_pytorch_model-00002-of-00002.safetensors': names[30:]}
        for fname, keys in shards.items():
            save_file(contiguous({k: sd[k] for k in keys}), str(folder / fname))
        (folder / 'diffusion_pytorch_model.safetensors.index.json').write_text(json.dumps(
            {'metadata': {}, 'weight_map': {k: f for f, ks in shards.items() for k in ks}}))
        (folder / 'config.json').write_text(json.dumps(ext['dit_config']))
    (root / 'text_encoder').mkdir()
    # HF writes the tied embedding once, as shared.weight
    save_file(contiguous({T5_HF_NAMES.to_theirs(k): v for k, v in w['t5'].items()}),
              str(root / 'text_encoder' / 'model.safetensors'))
    (root / 'vae').mkdir()
    save_file(contiguous({VAE_DIFFUSERS_NAMES.to_theirs(k): v for k, v in w['vae'].items()}),
              str(root / 'vae' / 'diffusion_pytorch_model.safetensors'))
    write_tokenizer_dir(root / 'tokenizer')
    (root / 'model_index.json').write_text(json.dumps({'boundary_ratio': 0.875}))
    (root / 'scheduler').mkdir()
    (root / 'scheduler' / 'scheduler_config.json').write_text(json.dumps({'flow_shift': 3.0}))


def write_comfy(root, w, variant):
    write_comfy_dit(root / f'wan2.2_t2v_high_noise_14B_{variant}.safetensors', w['high'], variant)
    write_comfy_dit(root / f'wan2.2_t2v_low_noise_14B_{variant}.safetensors', w['low'], variant)
    # ComfyUI's T5 file: transformers' names, both spellings of the tied embedding
    t5 = {T5_HF_NAMES.to_theirs(k): v for k, v in w['t5'].items()}
    t5['encoder.embed_tokens.weight'] = w['t5']['token_embedding.weight'].clone()
    save_file(contiguous(t5), str(root / 'umt5_xxl_fp16.safetensors'))
    save_file(contiguous(w['vae']), str(root / 'wan_2.1_vae.safetensors'))
    # the tokenizer is not part of ComfyUI's files: the original folder supplies it
    write_tokenizer_dir(root / 'google' / 'umt5-xxl')


# ----------------------------------------------------------------------------- name maps
def test_dit_map_follows_the_issue_table():
    expected = {
        'text_embedding.0.weight': 'condition_embedder.text_embedder.linear_1.weight',
        'text_embedding.2.bias': 'condition_embedder.text_embedder.linear_2.bias',
        'time_embedding.0.weight': 'condition_embedder.time_embedder.linear_1.weight',
        'time_embedding.2.bias': 'condition_embedder.time_embedder.linear_2.bias',
        'time_projection.1.weight': 'condition_embedder.time_proj.weight',
        'head.modulation': 'scale_shift_table',
        'head.head.weight': 'proj_out.weight',
        'blocks.7.modulation': 'blocks.7.scale_shift_table',
        'blocks.7.self_attn.q.weight': 'blocks.7.attn1.to_q.weight',
        'blocks.7.self_attn.o.bias': 'blocks.7.attn1.to_out.0.bias',
        'blocks.7.cross_attn.k.weight': 'blocks.7.attn2.to_k.weight',
        'blocks.7.cross_attn.v.bias': 'blocks.7.attn2.to_v.bias',
        'blocks.7.self_attn.norm_q.weight': 'blocks.7.attn1.norm_q.weight',
        'blocks.7.cross_attn.norm_k.weight': 'blocks.7.attn2.norm_k.weight',
        'blocks.7.norm3.weight': 'blocks.7.norm2.weight',
        'blocks.7.ffn.0.weight': 'blocks.7.ffn.net.0.proj.weight',
        'blocks.7.ffn.2.bias': 'blocks.7.ffn.net.2.bias',
        'patch_embedding.weight': 'patch_embedding.weight',
    }
    for ours, theirs in expected.items():
        assert DIT_DIFFUSERS_NAMES.to_theirs(ours) == theirs
        assert DIT_DIFFUSERS_NAMES.to_ours(theirs) == ours


@pytest.mark.parametrize('component', ['dit', 'vae', 't5'])
def test_maps_match_the_libraries_names_and_shapes(component):
    """Every tensor of our tiny model maps to exactly one name diffusers/transformers write,
    with the same shape (no reshapes), and back."""
    ext = external_names()[component]
    factory, names = {'dit': (dit_factory, DIT_DIFFUSERS_NAMES),
                      'vae': (vae_factory, VAE_DIFFUSERS_NAMES),
                      't5': (t5_factory, T5_HF_NAMES)}[component]
    ours = module_tensor_shapes(build_on_meta(factory))
    theirs = {names.to_theirs(k): k for k in ours}
    assert len(theirs) == len(ours)  # injective
    library = dict(ext)
    if component == 't5':  # the tied copy: read as an alias, never written
        assert names.to_ours('encoder.embed_tokens.weight') == 'token_embedding.weight'
        del library['encoder.embed_tokens.weight']
    assert set(theirs) == set(library)
    for t, o in theirs.items():
        assert tuple(library[t]) == tuple(ours[o]), t
        assert names.to_ours(t) == o


def test_unknown_names_pass_through_for_the_loader_to_report():
    assert DIT_DIFFUSERS_NAMES.to_ours('blocks.0.attn2.add_k_proj.weight') == \
        'blocks.0.cross_attn.add_k_proj.weight'
    assert VAE_DIFFUSERS_NAMES.to_ours('decoder.something.weight') == 'decoder.something.weight'


# ----------------------------------------------------------------------------- layouts
LAYOUTS = ['original', 'diffusers', 'comfy_fp16', 'comfy_fp8_scaled', 'comfy_fp8_weight_scale']


def write_layout(root, w, layout):
    if layout == 'original':
        write_original(root, w)
    elif layout == 'diffusers':
        write_diffusers(root, w)
    else:
        write_comfy(root, w, {'comfy_fp16': 'fp16', 'comfy_fp8_scaled': 'fp8_scaled',
                              'comfy_fp8_weight_scale': 'fp8_e4m3fn_scaled'}[layout])


@pytest.mark.parametrize('layout', LAYOUTS)
def test_every_layout_loads_the_same_tensors(tmp_path, weights, layout):
    write_layout(tmp_path, weights, layout)
    found = detect_layout(str(tmp_path))
    expected_kind = {'original': 'original', 'diffusers': 'diffusers'}.get(layout, 'comfyui')
    assert found.kind == expected_kind
    assert found.tokenizer.path.endswith('umt5-xxl' if layout != 'diffusers' else 'tokenizer')

    for component, key in (('high_noise_model', 'high'), ('low_noise_model', 'low')):
        source = getattr(found, component)
        got = load_source(source, dit_factory)
        want = weights[key]
        if layout == 'comfy_fp16':
            want = {k: v.half() for k, v in want.items()}
        elif layout.startswith('comfy_fp8'):
            assert source.quantization == 'scaled_fp8'
            want = dequantized(want)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            assert torch.equal(got[k], want[k]), k
        # the experts are not swapped (transformer/ is the high-noise one)
        other = weights['low' if key == 'high' else 'high']['patch_embedding.bias']
        assert not torch.equal(got['patch_embedding.bias'].float(), other)

    for component, factory in (('t5', t5_factory), ('vae', vae_factory)):
        got = load_source(getattr(found, component), factory)
        for k, v in weights[component].items():
            assert torch.equal(got[k], v), (component, k)
    if layout == 'diffusers':
        assert found.boundary_ratio == 0.875 and found.scheduler_shift == 3.0


def test_fp8_dequantization_to_a_requested_dtype_and_kept_fp8(tmp_path, weights):
    write_comfy(tmp_path, weights, 'fp8_scaled')
    source = detect_layout(str(tmp_path)).high_noise_model
    got = load_source(source, dit_factory, dtype=torch.float32)
    assert torch.equal(got['blocks.1.ffn.2.weight'],
                       dequantized(weights['high'], torch.float32)['blocks.1.ffn.2.weight'])
    assert got['blocks.1.ffn.2.weight'].dtype == torch.float32

    kept = dict(hooked(source.iter_tensors(), source.rename, source.transform(keep_fp8=True)))
    q, s = quantize(weights['high']['blocks.0.self_attn.q.weight'])
    assert kept['blocks.0.self_attn.q.weight'].dtype == E4M3
    assert torch.equal(kept['blocks.0.self_attn.q.weight'].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(kept['blocks.0.self_attn.q.weight_scale'], s)
    assert 'blocks.0.self_attn.q.scale_weight' not in kept
    assert not any(k.endswith(('scale_input', 'scaled_fp8')) for k in kept)
    # norms, biases and tables are not quantized and pass through
    assert torch.equal(kept['blocks.0.modulation'], weights['high']['blocks.0.modulation'])


@pytest.mark.parametrize('variant', ['fp8_scaled', 'fp8_weight_scale'])
def test_fp8_linears_take_a_scaled_fp8_files_weights_as_stored(tmp_path, weights, variant):
    """--quantize on a ComfyUI fp8_scaled expert: the chosen linears get the file's e4m3
    bytes and its per-tensor scale (as Fp8Linear's (out, 1)), never re-quantized; the other
    fp8 weights are dequantized; the forward equals fp8 linears built from the file's values
    beside the dequantized rest."""
    from wan.modules.fp8 import (Fp8Linear, fp8_weight_names, quantize_transform,
                                 swap_linears_)
    from wan.utils.dtype_policy import dtype_rule
    write_comfy(tmp_path, weights, variant)
    source = detect_layout(str(tmp_path)).high_noise_model
    rule = dtype_rule(WanModel, 'matmul', torch.bfloat16)
    names = []

    def before_load(model):
        swap_linears_(model, 'ffn')
        names.extend(fp8_weight_names(model))
    model = WanModel.from_source(source, TINY_DIT, dtype_rule=rule, before_load=before_load,
                                 transform=quantize_transform(names, 'cpu', rule),
                                 fp8_keep=names)
    assert names == [f'blocks.{i}.ffn.{j}.weight' for i in range(2) for j in (0, 2)]
    expected = load_tensors_(build_on_meta(dit_factory), dequantized(weights['high']).items(),
                             source='expected', dtype=rule)
    for name in names:
        q, scale = quantize(weights['high'][name])
        layer = model.get_submodule(name[:-len('.weight')])
        assert isinstance(layer, Fp8Linear)
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(layer.weight_scale, scale.expand(q.shape[0], 1))
        parent, _, child = name[:-len('.weight')].rpartition('.')
        bias = weights['high'][name[:-len('weight')] + 'bias']
        setattr(expected.get_submodule(parent), child, Fp8Linear.from_quantized(q, scale, bias))
    # not chosen by --quantize: dequantized from the file, as without --quantize
    assert torch.equal(model.blocks[0].self_attn.q.weight, expected.blocks[0].self_attn.q.weight)
    gen = torch.Generator().manual_seed(0)
    lat = [torch.randn(16, 3, 8, 8, generator=gen)]
    ctx = [torch.randn(7, TINY_DIT['text_dim'], generator=gen)]
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        got, want = (m(lat, torch.tensor([700]), ctx, seq_len=48)[0] for m in (model, expected))
    assert torch.equal(got, want)


def test_fp8_transform_buffers_only_until_the_partner_arrives():
    w, s = quantize(torch.randn(4, 3))
    order = [('a.weight', w), ('b.bias', torch.ones(2)), ('a.scale_weight', s),
             ('c.scale_weight', s), ('c.weight', w), ('d.weight', w)]  # d: fp8, no scale
    out = list(fp8_transform({'a', 'c'}, dtype=torch.float32)(iter(order)))
    names = [n for n, _ in out]
    assert names == ['b.bias', 'a.weight', 'c.weight', 'd.weight']
    assert torch.equal(out[1][1], w.float() * s)
    assert torch.equal(out[3][1], w.float())  # scale 1
    with pytest.raises(CheckpointError, match='a'):
        list(fp8_transform({'a'})(iter([('a.weight', w)])))


def test_per_row_scales(tmp_path):
    w = torch.randn(4, 3)
    s = w.abs().amax(dim=1) / 448
    q = (w / s[:, None]).to(E4M3)
    out = dict(fp8_transform({'x'}, dtype=torch.float32)(iter([('x.weight', q),
                                                               ('x.weight_scale', s)])))
    assert torch.equal(out['x.weight'], q.float() * s[:, None])


@pytest.mark.parametrize('how', ['weight_scale_2', 'comfy_quant', 'metadata'])
def test_nvfp4_files_are_refused(tmp_path, weights, how):
    write_original(tmp_path, weights)
    sd = {'blocks.0.self_attn.q.weight': torch.zeros(64, 32, dtype=torch.uint8)}
    metadata = None
    if how == 'weight_scale_2':
        sd['blocks.0.self_attn.q.weight_scale'] = torch.zeros(64, 4, dtype=E4M3)
        sd['blocks.0.self_attn.q.weight_scale_2'] = torch.ones(())
    elif how == 'comfy_quant':
        sd['blocks.0.self_attn.q.comfy_quant'] = torch.tensor(
            list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    else:
        metadata = {'_quantization_metadata': json.dumps(
            {'layers': {'blocks.0.self_attn.q': {'format': 'nvfp4'}}})}
    path = tmp_path / 'x_nvfp4.safetensors'
    save_file(sd, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match='Blackwell'):
        detect_layout(str(tmp_path), high_noise_file=str(path))


def test_missing_components_are_listed_with_what_was_found(tmp_path, weights):
    write_comfy_dit(tmp_path / 'wan2.2_t2v_high_noise_14B_fp16.safetensors', weights['high'],
                    'fp16')
    torch.save(weights['vae'], tmp_path / 'Wan2.1_VAE.pth')
    with pytest.raises(CheckpointError) as err:
        detect_layout(str(tmp_path))
    msg = str(err.value)
    assert '\n' not in msg
    for text in ('missing low-noise expert', 'low_noise_model/', 'transformer_2/',
                 '*low_noise*.safetensors', 'T5 text encoder', 'tokenizer (looked for',
                 'google/umt5-xxl/', 'found high-noise expert: comfyui',
                 'wan2.2_t2v_high_noise_14B_fp16.safetensors', 'VAE: original'):
        assert text in msg, text
    assert 'missing VAE' not in msg


def test_two_candidate_comfy_files_need_an_explicit_choice(tmp_path, weights):
    write_comfy(tmp_path, weights, 'fp16')
    write_comfy_dit(tmp_path / 'wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors',
                    weights['high'], 'fp8_scaled')
    with pytest.raises(CheckpointError, match='--high_noise_file'):
        detect_layout(str(tmp_path))
    chosen = str(tmp_path / 'wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors')
    found = detect_layout(str(tmp_path), high_noise_file=chosen)
    assert found.high_noise_model.path == chosen
    assert found.high_noise_model.quantization == 'scaled_fp8'


def test_mixed_layout_and_unprefixed_comfy_names(tmp_path, weights):
    """ComfyUI expert files (one without the model.diffusion_model. prefix) next to the
    original T5, VAE and tokenizer."""
    write_original(tmp_path, weights)
    other = tmp_path / 'files'
    other.mkdir()
    save_file(contiguous(weights['low']), str(other / 'low.safetensors'))
    write_comfy_dit(other / 'high.safetensors', weights['high'], 'fp16')
    found = detect_layout(str(tmp_path), high_noise_file=str(other / 'high.safetensors'),
                          low_noise_file=str(other / 'low.safetensors'))
    assert found.kind == 'mixed'
    got = load_source(found.low_noise_model, dit_factory)
    assert all(torch.equal(got[k], v) for k, v in weights['low'].items())


def test_a_lora_is_not_mistaken_for_an_expert(tmp_path, weights):
    write_original(tmp_path, weights)
    path = tmp_path / 'high_noise_lightning.safetensors'
    save_file({'diffusion_model.blocks.0.self_attn.q.lora_down.weight': torch.zeros(4, 64)},
              str(path))
    with pytest.raises(CheckpointError, match='--lora'):
        detect_layout(str(tmp_path), high_noise_file=str(path))


# ----------------------------------------------------------------------------- semantics
needs_transformers = pytest.mark.skipif(importlib.util.find_spec('transformers') is None,
                                        reason='transformers not installed')


@needs_transformers
def test_hf_umt5_weights_give_the_same_encoder_output(tmp_path, weights):
    """transformers' UMT5EncoderModel and our T5Encoder with its renamed weights compute the
    same thing (checks wi_0/wi_1 and the per-block relative-position bias)."""
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    hf = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=32,
                                     feed_forward_proj='gated-gelu')).eval()
    with torch.no_grad():  # a non-trivial bias table in every block
        for block in hf.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_()
    write_diffusers(tmp_path, weights)
    os.remove(tmp_path / 'text_encoder' / 'model.safetensors')
    hf.save_pretrained(str(tmp_path / 'text_encoder'))  # a file transformers writes
    source = detect_layout(str(tmp_path)).t5
    ours = build_on_meta(t5_factory)
    load_tensors_(ours, hooked(source.iter_tensors(), source.rename, source.transform()),
                  source='hf')
    ours.eval()
    ids = torch.randint(0, 384, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :25], want[1, :25], rtol=1e-5, atol=1e-5)


@needs_transformers
def test_folder_written_by_diffusers_loads_and_computes_the_same(tmp_path):
    """A Diffusers folder that diffusers itself writes loads, and the tiny DiT and VAE compute
    what diffusers' own modules compute (checks the norm2/norm3 swap, the modulation tables,
    the VAE block regrouping)."""
    diffusers = pytest.importorskip('diffusers', reason='diffusers not installed (optional)')
    ext = external_names()
    torch.manual_seed(0)
    dit = diffusers.WanTransformer3DModel(**ext['dit_config']).eval()
    with torch.no_grad():
        for p in dit.parameters():  # random biases and norm scales too
            p.add_(torch.randn_like(p) * 0.1)
    dit.save_pretrained(str(tmp_path / 'transformer'))
    diffusers.WanTransformer3DModel(**ext['dit_config']).save_pretrained(
        str(tmp_path / 'transformer_2'))
    vae = diffusers.AutoencoderKLWan(**ext['vae_config']).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(str(tmp_path / 'vae'))
    from transformers import UMT5Config, UMT5EncoderModel
    UMT5EncoderModel(UMT5Config(**ext['t5_config'])).save_pretrained(str(tmp_path / 'text_encoder'))
    write_tokenizer_dir(tmp_path / 'tokenizer')

    found = detect_layout(str(tmp_path))
    assert found.kind == 'diffusers'
    ours = build_on_meta(dit_factory)
    src = found.high_noise_model
    load_tensors_(ours, hooked(src.iter_tensors(), src.rename, src.transform()), source='dit')
    ours.set_options(ForwardOptions(attn_dtype=torch.float32))  # default: bf16 attention
    load_source(found.t5, t5_factory)
    x = torch.randn(16, 3, 4, 6)
    ctx = torch.randn(512, 32)
    t = torch.tensor([700.0])
    with torch.no_grad():
        want = dit(hidden_states=x[None], timestep=t, encoder_hidden_states=ctx[None]).sample[0]
        got = ours([x], t=t, context=[ctx], seq_len=3 * 2 * 3)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    ours_vae = Wan2_1_VAE(vae_pth=None, device='cpu', dim=8, random_init_seed=0)
    state = load_source(found.vae, vae_factory)
    ours_vae.model.load_state_dict(state)
    z = torch.randn(16, 3, 4, 4)
    with torch.no_grad():
        got = ours_vae.decode([z])[0]
        std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
        want = vae.decode(z[None] * std + mean).sample[0].clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
