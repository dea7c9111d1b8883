"""The pipeline on other checkpoint layouts and with LoRAs (tiny config, CPU): the same
weights in the original, Diffusers or ComfyUI layout give the same video; a LoRA given to the
pipeline is merged exactly as merging it into the loaded weights by hand."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from wan.text2video import WanT2V
from wan.utils.formats import DIT_DIFFUSERS_NAMES, T5_HF_NAMES, VAE_DIFFUSERS_NAMES
from wan.utils.lora import LoraSpec, load_lora, merge_loras_

KW = dict(size=(128, 64), frame_num=5, shift=12.0, sampling_steps=3, guide_scale=(3.0, 4.0),
          seed=9, offload_model=True)


def contiguous(sd):
    return {k: v.detach().contiguous() for k, v in sd.items()}


@pytest.fixture(scope='module')
def original(released_ckpt):
    """The tiny pipeline in the released layout, with a real tokenizer folder (conftest)."""
    return released_ckpt


def video(pipe):
    return pipe.generate('a cat plays the piano', **KW)


@pytest.fixture(scope='module')
def reference_video(tiny_cfg, original):
    return video(WanT2V(tiny_cfg, str(original)))


def test_comfyui_experts_beside_the_original_files(tmp_path, tiny_cfg, tiny_pipe, original,
                                                   reference_video):
    root = tmp_path / 'comfy'
    root.mkdir()
    for name in ('models_t5_umt5-xxl-enc-bf16.pth', 'Wan2.1_VAE.pth'):
        os.link(original / name, root / name)
    os.symlink(original / 'google', root / 'google')
    for tag, attr in (('high', 'high_noise_model'), ('low', 'low_noise_model')):
        sd = {f'model.diffusion_model.{k}': v for k, v in getattr(tiny_pipe, attr).state_dict().items()}
        save_file(contiguous(sd), str(root / f'wan2.2_t2v_{tag}_noise_14B_fp32.safetensors'))
    pipe = WanT2V(tiny_cfg, str(root))
    assert pipe.layout.high_noise_model.layout == 'comfyui'
    assert torch.equal(video(pipe), reference_video)


def test_diffusers_layout(tmp_path, tiny_cfg, tiny_pipe, original, reference_video):
    root = tmp_path / 'diffusers'
    root.mkdir()
    cfg = {'_class_name': 'WanTransformer3DModel', 'num_attention_heads': tiny_cfg.num_heads,
           'attention_head_dim': tiny_cfg.dim // tiny_cfg.num_heads, 'ffn_dim': tiny_cfg.ffn_dim,
           'freq_dim': tiny_cfg.freq_dim, 'text_dim': tiny_cfg.text_dim, 'in_channels': 16,
           'out_channels': 16, 'num_layers': tiny_cfg.num_layers, 'patch_size': [1, 2, 2],
           'eps': 1e-6, 'cross_attn_norm': True, 'qk_norm': 'rms_norm_across_heads'}
    for sub, attr in (('transformer', 'high_noise_model'), ('transformer_2', 'low_noise_model')):
        (root / sub).mkdir()
        sd = {DIT_DIFFUSERS_NAMES.to_theirs(k): v
              for k, v in getattr(tiny_pipe, attr).state_dict().items()}
        save_file(contiguous(sd), str(root / sub / 'diffusion_pytorch_model.safetensors'))
        (root / sub / 'config.json').write_text(json.dumps(cfg))
    (root / 'text_encoder').mkdir()
    save_file(contiguous({T5_HF_NAMES.to_theirs(k): v
                          for k, v in tiny_pipe.text_encoder.model.state_dict().items()}),
              str(root / 'text_encoder' / 'model.safetensors'))
    (root / 'vae').mkdir()
    save_file(contiguous({VAE_DIFFUSERS_NAMES.to_theirs(k): v
                          for k, v in tiny_pipe.vae.model.state_dict().items()}),
              str(root / 'vae' / 'diffusion_pytorch_model.safetensors'))
    os.symlink(original / 'google' / 'umt5-xxl', root / 'tokenizer')
    (root / 'model_index.json').write_text(json.dumps({'boundary_ratio': 0.875}))
    pipe = WanT2V(tiny_cfg, str(root))
    assert pipe.layout.kind == 'diffusers'
    assert torch.equal(video(pipe), reference_video)


def _lora(path, model, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ('blocks.0.self_attn.q', 'blocks.1.ffn.2'):
        w = model.get_submodule(name).weight
        sd[f'diffusion_model.{name}.lora_down.weight'] = torch.randn(rank, w.shape[1], generator=g)
        sd[f'diffusion_model.{name}.lora_up.weight'] = torch.randn(w.shape[0], rank, generator=g)
        sd[f'diffusion_model.{name}.alpha'] = torch.tensor(2.0)
    save_file(sd, str(path))
    return str(path)


def test_loras_merged_as_they_load_equal_a_merge_by_hand(tmp_path, tiny_cfg, tiny_pipe,
                                                        original):
    path = _lora(tmp_path / 'l.safetensors', tiny_pipe.high_noise_model)
    with_lora = WanT2V(tiny_cfg, str(original), loras_high=[f'{path}:0.5'])
    by_hand = WanT2V(tiny_cfg, str(original))
    merge_loras_(by_hand.high_noise_model, [load_lora(LoraSpec(path, 0.5))])
    for (n, a), (_, b) in zip(with_lora.high_noise_model.state_dict().items(),
                              by_hand.high_noise_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert not torch.equal(with_lora.high_noise_model.blocks[0].self_attn.q.weight,
                           tiny_pipe.high_noise_model.blocks[0].self_attn.q.weight)
    # the low-noise expert got none; strength 0 is the identity
    assert torch.equal(with_lora.low_noise_model.blocks[0].self_attn.q.weight,
                       tiny_pipe.low_noise_model.blocks[0].self_attn.q.weight)
    zero = WanT2V(tiny_cfg, str(original), loras=[f'{path}:0'])
    assert torch.equal(zero.high_noise_model.blocks[0].self_attn.q.weight,
                       tiny_pipe.high_noise_model.blocks[0].self_attn.q.weight)


def test_loras_on_random_weights_equal_a_merge_by_hand(tmp_path, tiny_cfg, tiny_pipe):
    """Random weights stream through the same LoRA merge as a checkpoint's: the values of
    merging into the finished random expert."""
    path = _lora(tmp_path / 'l.safetensors', tiny_pipe.high_noise_model)
    with_lora = WanT2V(tiny_cfg, None, random_init=True, device='cpu',
                       loras_high=[f'{path}:0.5'])
    by_hand = WanT2V(tiny_cfg, None, random_init=True, device='cpu')
    merge_loras_(by_hand.high_noise_model, [load_lora(LoraSpec(path, 0.5))])
    for (n, a), (_, b) in zip(with_lora.high_noise_model.state_dict().items(),
                              by_hand.high_noise_model.state_dict().items()):
        assert torch.equal(a, b), n
    plain = WanT2V(tiny_cfg, None, random_init=True, device='cpu')
    assert not torch.equal(with_lora.high_noise_model.blocks[0].self_attn.q.weight,
                           plain.high_noise_model.blocks[0].self_attn.q.weight)


def test_a_missing_lora_is_refused_before_any_model_is_built(tmp_path, tiny_cfg, original,
                                                             no_model_build):
    with pytest.raises(FileNotFoundError, match='LoRA file not found'):
        WanT2V(tiny_cfg, str(original), loras=[str(tmp_path / 'nope.safetensors')])


def test_preset_lightning_fills_what_was_not_given(tmp_path):
    import generate
    p = generate._parser()
    args = p.parse_args(['--task', 't2v-tiny', '--random_init', '--preset', 'lightning',
                         '--save_file', str(tmp_path / 'x.mp4')])
    generate.validate_args(args, 1)
    assert (args.sample_solver, args.sample_steps, args.sample_shift,
            args.sample_guide_scale, args.boundary) == ('euler', 4, 5.0, (1.0, 1.0), 0.875)
    args = p.parse_args(['--task', 't2v-tiny', '--random_init', '--preset', 'lightning',
                         '--sample_steps', '6', '--save_file', str(tmp_path / 'x.mp4')])
    generate.validate_args(args, 1)
    assert args.sample_steps == 6 and args.sample_solver == 'euler'  # explicit flags win


def test_lora_flags(tmp_path, capsys):
    import generate
    with pytest.raises(SystemExit):
        generate._parser().parse_args(['--lora', 'x.safetensors:abc:'])
    assert 'argument --lora:' in capsys.readouterr().err  # the parser's own message
    rc = generate.main(['--task', 't2v-tiny', '--random_init', '--lora',
                        str(tmp_path / 'missing.safetensors'), '--save_file',
                        str(tmp_path / 'x.mp4')])
    err = capsys.readouterr().err
    assert rc == 1 and err.count('error:') == 1 and 'LoRA file not found' in err
    assert not (tmp_path / 'x.mp4').exists()
