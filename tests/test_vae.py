"""Tests of the Wan2.1 VAE (wan/modules/vae2_1.py) against docs/VAE.md.

CPU only and fast: the full-size model is only ever built on the meta device (structure and
parameter counts); behaviour is checked on a tiny VAE of the same topology (dim=8). The
chunked encode/decode is compared with an independent whole-sequence implementation written
here from docs/VAE.md, which pins the cache rules and the first-chunk special cases.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wan.modules import vae2_1
from wan.modules.vae2_1 import (
    CausalConv3d, FeatureCache, RMS_norm, Resample, ResidualBlock, Wan2_1_VAE, WanVAE_,
    count_causal_convs)
from wan.utils.checkpoint import CheckpointError
from wan.utils.random_init import build_on_meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# docs/VAE.md#latent-normalisation, copied by hand (not from the module under test).
SPEC_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
             0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
SPEC_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def tiny() -> Wan2_1_VAE:
    return Wan2_1_VAE(device='cpu', dim=8, random_init_seed=0)


@pytest.fixture(scope='module')
def full_meta() -> WanVAE_:
    return build_on_meta(lambda: vae2_1._video_vae(z_dim=16, dim=96))


# --------------------------------------------------------------------------------------------
# Structure of the full-size model (meta device, no memory)
# --------------------------------------------------------------------------------------------

def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts(full_meta):
    assert _count(full_meta) == 126_892_531
    assert _count(full_meta.encoder) == 53_595_872
    assert _count(full_meta.decoder) == 73_295_331
    assert _count(full_meta.conv1) + _count(full_meta.conv2) == 1_328


SPEC_SHAPES = {
    # encoder
    'encoder.conv1.weight': (96, 3, 3, 3, 3),
    'encoder.downsamples.0.residual.0.gamma': (96, 1, 1, 1),
    'encoder.downsamples.0.residual.2.weight': (96, 96, 3, 3, 3),
    'encoder.downsamples.1.residual.6.weight': (96, 96, 3, 3, 3),
    'encoder.downsamples.2.resample.1.weight': (96, 96, 3, 3),
    'encoder.downsamples.3.residual.0.gamma': (96, 1, 1, 1),
    'encoder.downsamples.3.residual.2.weight': (192, 96, 3, 3, 3),
    'encoder.downsamples.3.residual.3.gamma': (192, 1, 1, 1),
    'encoder.downsamples.3.residual.6.weight': (192, 192, 3, 3, 3),
    'encoder.downsamples.3.shortcut.weight': (192, 96, 1, 1, 1),
    'encoder.downsamples.4.residual.2.weight': (192, 192, 3, 3, 3),
    'encoder.downsamples.5.resample.1.weight': (192, 192, 3, 3),
    'encoder.downsamples.5.time_conv.weight': (192, 192, 3, 1, 1),
    'encoder.downsamples.6.residual.2.weight': (384, 192, 3, 3, 3),
    'encoder.downsamples.6.shortcut.weight': (384, 192, 1, 1, 1),
    'encoder.downsamples.7.residual.6.weight': (384, 384, 3, 3, 3),
    'encoder.downsamples.8.resample.1.weight': (384, 384, 3, 3),
    'encoder.downsamples.8.time_conv.weight': (384, 384, 3, 1, 1),
    'encoder.downsamples.9.residual.2.weight': (384, 384, 3, 3, 3),
    'encoder.downsamples.10.residual.6.weight': (384, 384, 3, 3, 3),
    'encoder.middle.0.residual.0.gamma': (384, 1, 1, 1),
    'encoder.middle.1.norm.gamma': (384, 1, 1),
    'encoder.middle.1.to_qkv.weight': (1152, 384, 1, 1),
    'encoder.middle.1.to_qkv.bias': (1152,),
    'encoder.middle.1.proj.weight': (384, 384, 1, 1),
    'encoder.middle.2.residual.6.weight': (384, 384, 3, 3, 3),
    'encoder.head.0.gamma': (384, 1, 1, 1),
    'encoder.head.2.weight': (32, 384, 3, 3, 3),
    'encoder.head.2.bias': (32,),
    # latent convs
    'conv1.weight': (32, 32, 1, 1, 1),
    'conv1.bias': (32,),
    'conv2.weight': (16, 16, 1, 1, 1),
    'conv2.bias': (16,),
    # decoder
    'decoder.conv1.weight': (384, 16, 3, 3, 3),
    'decoder.middle.1.norm.gamma': (384, 1, 1),
    'decoder.middle.1.to_qkv.weight': (1152, 384, 1, 1),
    'decoder.middle.1.proj.weight': (384, 384, 1, 1),
    'decoder.upsamples.0.residual.2.weight': (384, 384, 3, 3, 3),
    'decoder.upsamples.2.residual.6.weight': (384, 384, 3, 3, 3),
    'decoder.upsamples.3.time_conv.weight': (768, 384, 3, 1, 1),
    'decoder.upsamples.3.time_conv.bias': (768,),
    'decoder.upsamples.3.resample.1.weight': (192, 384, 3, 3),
    'decoder.upsamples.4.residual.0.gamma': (192, 1, 1, 1),
    'decoder.upsamples.4.residual.2.weight': (384, 192, 3, 3, 3),
    'decoder.upsamples.4.residual.3.gamma': (384, 1, 1, 1),
    'decoder.upsamples.4.shortcut.weight': (384, 192, 1, 1, 1),
    'decoder.upsamples.6.residual.6.weight': (384, 384, 3, 3, 3),
    'decoder.upsamples.7.time_conv.weight': (768, 384, 3, 1, 1),
    'decoder.upsamples.7.resample.1.weight': (192, 384, 3, 3),
    'decoder.upsamples.8.residual.2.weight': (192, 192, 3, 3, 3),
    'decoder.upsamples.10.residual.6.weight': (192, 192, 3, 3, 3),
    'decoder.upsamples.11.resample.1.weight': (96, 192, 3, 3),
    'decoder.upsamples.12.residual.0.gamma': (96, 1, 1, 1),
    'decoder.upsamples.14.residual.6.weight': (96, 96, 3, 3, 3),
    'decoder.head.0.gamma': (96, 1, 1, 1),
    'decoder.head.2.weight': (3, 96, 3, 3, 3),
    'decoder.head.2.bias': (3,),
}


def test_full_size_names_and_shapes(full_meta):
    shapes = {k: tuple(v.shape) for k, v in full_meta.state_dict().items()}
    for name, shape in SPEC_SHAPES.items():
        assert shapes.get(name) == shape, name
    # Only the 2-D resamples lack a time conv; only the width changes have a shortcut conv.
    assert 'encoder.downsamples.2.time_conv.weight' not in shapes
    assert 'decoder.upsamples.11.time_conv.weight' not in shapes
    shortcuts = sorted(k for k in shapes if 'shortcut' in k and k.endswith('weight'))
    assert shortcuts == ['decoder.upsamples.4.shortcut.weight',
                         'encoder.downsamples.3.shortcut.weight',
                         'encoder.downsamples.6.shortcut.weight']
    # RMS_norm has no bias parameter; every conv has a bias of size C_out.
    assert not any(k.endswith('.bias') and ('residual.0' in k or 'residual.3' in k
                                            or 'norm' in k or 'head.0' in k) for k in shapes)
    for name, shape in shapes.items():
        if name.endswith('.weight'):
            assert shapes[name[:-len('weight')] + 'bias'] == (shape[0],), name
        else:
            assert name.endswith(('.gamma', '.bias')), name
    modes = {i: m.mode for i, m in enumerate(full_meta.encoder.downsamples)
             if isinstance(m, Resample)}
    assert modes == {2: 'downsample2d', 5: 'downsample3d', 8: 'downsample3d'}
    modes = {i: m.mode for i, m in enumerate(full_meta.decoder.upsamples)
             if isinstance(m, Resample)}
    assert modes == {3: 'upsample3d', 7: 'upsample3d', 11: 'upsample2d'}
    assert len(full_meta.encoder.downsamples) == 11 and len(full_meta.decoder.upsamples) == 15


def test_cache_slot_counts(full_meta, tiny):
    assert count_causal_convs(full_meta.encoder) == 26
    assert count_causal_convs(full_meta.decoder) == 33
    assert (full_meta.encoder_cache_slots, full_meta.decoder_cache_slots) == (26, 33)
    # Slots actually claimed per chunk: every causal conv but the 1x1x1 shortcuts.
    model = tiny.model
    cache = FeatureCache(model.encoder_cache_slots)
    model.encoder(_randn(1, 3, 1, 16, 16), cache)
    assert cache.cursor == 24
    cache = FeatureCache(model.decoder_cache_slots)
    model.decoder(_randn(1, 16, 1, 2, 2), cache)
    assert cache.cursor == 32


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def test_causal_conv3d_padding_and_cache():
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, 3, padding=1)
    x = _randn(1, 2, 4, 5, 5, seed=1)
    w, b = conv.weight, conv.bias
    with torch.no_grad():
        # No cache: 2 zero frames in front, none behind, 1 pixel on each spatial side.
        manual = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), w, b)
        assert torch.allclose(conv(x), manual, atol=1e-6)
        assert conv(x).shape[2] == 4
        # A zero cache of 2 frames is the same as no cache.
        assert torch.allclose(conv(x, torch.zeros(1, 2, 2, 5, 5)), manual, atol=1e-6)
        # A real cache replaces the zero frames: 2 frames -> no zeros, 1 frame -> 1 zero.
        c2 = _randn(1, 2, 2, 5, 5, seed=2)
        manual2 = F.conv3d(F.pad(torch.cat([c2, x], 2), (1, 1, 1, 1, 0, 0)), w, b)
        assert torch.allclose(conv(x, c2), manual2, atol=1e-6)
        c1 = c2[:, :, 1:]
        manual1 = F.conv3d(F.pad(torch.cat([c1, x], 2), (1, 1, 1, 1, 1, 0)), w, b)
        assert torch.allclose(conv(x, c1), manual1, atol=1e-6)
        # Causal: changing the last frame leaves earlier outputs untouched.
        x2 = x.clone()
        x2[:, :, -1] += 1.0
        assert torch.equal(conv(x2)[:, :, :-1], conv(x)[:, :, :-1])
        # 1x1x1 convs never take the cache.
        point = CausalConv3d(2, 3, 1)
        assert torch.equal(point(x, c2), point(x))


def test_rms_norm_hand_example():
    norm = RMS_norm(2, images=False)
    assert [n for n, _ in norm.named_parameters()] == ['gamma']
    assert tuple(norm.gamma.shape) == (2, 1, 1, 1)
    assert tuple(RMS_norm(2).gamma.shape) == (2, 1, 1)
    with torch.no_grad():
        norm.gamma.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1, 1)
        # ||(3,4)|| = 5 -> (0.6, 0.8) * sqrt(2) * gamma
        expected = torch.tensor([0.6, 1.6]).view(1, 2, 1, 1, 1) * 2 ** 0.5
        assert torch.allclose(norm(x), expected, atol=1e-6)
        # No eps inside the sqrt: tiny inputs are still normalised to unit RMS...
        assert torch.allclose(norm(x * 1e-8), expected, atol=1e-6)
        # ...and an all-zero vector stays zero (the 1e-12 clamp, no NaN).
        assert torch.equal(norm(torch.zeros(1, 2, 1, 1, 1)), torch.zeros(1, 2, 1, 1, 1))


def test_attention_block_per_frame_single_head():
    torch.manual_seed(0)
    block = vae2_1.AttentionBlock(4)
    with torch.no_grad():
        block.norm.gamma.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]).view(4, 1, 1))
        x = _randn(1, 4, 3, 2, 3, seed=20)
        y = block(x)
        for t in range(3):
            frame = x[0, :, t]  # (C, H, W)
            n = F.normalize(frame, dim=0) * 2.0 * block.norm.gamma  # sqrt(C) = 2
            qkv = torch.einsum('oc,chw->ohw', block.to_qkv.weight[:, :, 0, 0], n)
            qkv = (qkv + block.to_qkv.bias.view(-1, 1, 1)).flatten(1)  # (3C, HW)
            q, k, v = qkv[0:4], qkv[4:8], qkv[8:12]
            attn = torch.softmax(q.T @ k / 4 ** 0.5, dim=-1)  # (HW, HW), scale 1/sqrt(C)
            o = (attn @ v.T).T  # (C, HW)
            o = block.proj.weight[:, :, 0, 0] @ o + block.proj.bias.view(-1, 1)
            assert torch.allclose(y[0, :, t], o.view(4, 2, 3) + frame, atol=1e-5), t


def _set_upsample3d_probe(r: Resample) -> None:
    """time_conv: first half = x_t + 100·x_{t-2}, second half = 10·x_t; resample.1 picks
    channel 0 of the upsampled frame."""
    with torch.no_grad():
        r.time_conv.weight.zero_()
        r.time_conv.bias.zero_()
        for c in range(2):
            r.time_conv.weight[c, c, 2] = 1.0
            r.time_conv.weight[c, c, 0] = 100.0
            r.time_conv.weight[2 + c, c, 2] = 10.0
        conv = r.resample[1]
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0, 1, 1] = 1.0


def _frames(values) -> torch.Tensor:
    """(1, 2, T, 1, 1) with both channels equal to `values` along time."""
    v = torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1, 1)
    return v.expand(1, 2, -1, 1, 1).contiguous()


def _run_chunks(r: Resample, chunks) -> list:
    cache = FeatureCache(1)
    outs = []
    with torch.no_grad():
        for chunk in chunks:
            cache.start_chunk()
            y = r(_frames(chunk), cache)
            assert y.shape[-2:] == (2, 2)  # x2 nearest upsample
            outs.append(y[0, 0, :, 0, 0].tolist())
    return outs


def test_upsample3d_interleave_first_chunk_and_cache():
    r = Resample(2, 'upsample3d')
    _set_upsample3d_probe(r)
    # Chunk 0 is not doubled; chunk 1 runs with zero padding (not frame 0); later chunks use
    # the cache; frames 2t come from channels [0:C], 2t+1 from [C:2C].
    assert _run_chunks(r, [[7], [1, 2], [3], [4]]) == [
        [7], [1, 10, 2, 20], [103, 30], [204, 40]]
    # One-frame chunks (the decoder's first upsample3d): the cache is topped up to 2 frames.
    assert _run_chunks(r, [[7], [1], [2], [3]]) == [[7], [1, 10], [2, 20], [103, 30]]


def test_downsample3d_first_chunk_and_cache():
    r = Resample(1, 'downsample3d')
    with torch.no_grad():
        r.time_conv.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1, 1))
        r.time_conv.bias.zero_()
        r.resample[1].weight.zero_()
        r.resample[1].weight[0, 0, 0, 0] = 1.0  # output pixel = top-left input pixel
        r.resample[1].bias.zero_()
        cache = FeatureCache(1)
        outs = []
        for chunk in ([2.0], [3.0, 5.0, 7.0, 11.0], [13.0, 17.0, 19.0, 23.0]):
            cache.start_chunk()
            x = torch.tensor(chunk).view(1, 1, -1, 1, 1).expand(1, 1, -1, 2, 2)
            outs.append(r(x, cache)[0, 0, :, 0, 0].tolist())
    # Chunk 0 passes through; then an unpadded stride-2 conv over [previous frame, chunk].
    assert outs == [[2.0], [2 + 30 + 500, 5 + 70 + 1100], [11 + 130 + 1700, 17 + 190 + 2300]]


def test_downsample_pads_right_and_bottom_only():
    r = Resample(1, 'downsample2d')
    x = _randn(1, 1, 2, 4, 4, seed=3)
    with torch.no_grad():
        y = r(x)
        frames = x[0].transpose(0, 1)
        w, b = r.resample[1].weight, r.resample[1].bias
        manual = F.conv2d(F.pad(frames, (0, 1, 0, 1)), w, b, stride=2)
        symmetric = F.conv2d(F.pad(frames, (1, 1, 1, 1)), w, b, stride=2)
    assert y.shape == (1, 1, 2, 2, 2)
    assert torch.allclose(y[0].transpose(0, 1), manual, atol=1e-6)
    assert not torch.allclose(manual, symmetric, atol=1e-3)


def test_upsample_nearest_keeps_dtype():
    x = _randn(1, 2, 3, 3).to(torch.bfloat16)
    y = vae2_1.Upsample()(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


# --------------------------------------------------------------------------------------------
# An independent whole-sequence implementation (docs/VAE.md#building-blocks without chunks or
# caches)
# --------------------------------------------------------------------------------------------

def _conv_full(conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
    kt, kh, kw = conv.weight.shape[2:]
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0))
    return F.conv3d(x, conv.weight, conv.bias)


def _res_full(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    h = x if isinstance(block.shortcut, nn.Identity) else _conv_full(block.shortcut, x)
    r = block.residual
    y = _conv_full(r[2], F.silu(r[0](x)))
    return _conv_full(r[6], F.silu(r[3](y))) + h


def _spatial_full(r: Resample, x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    y = r.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _resample_full(r: Resample, x: torch.Tensor) -> torch.Tensor:
    if r.mode == 'upsample3d' and x.shape[2] > 1:
        # Frame 0 passes through; frames 1.. get a causal time conv (zero front padding)
        # whose two channel halves become frames 2t and 2t+1.
        y = _conv_full(r.time_conv, x[:, :, 1:])
        c = y.shape[1] // 2
        pairs = torch.stack([y[:, :c], y[:, c:]], dim=3)  # (B, C, T, 2, H, W)
        doubled = pairs.flatten(2, 3)
        x = torch.cat([x[:, :, :1], doubled], dim=2)
    x = _spatial_full(r, x)
    if r.mode == 'downsample3d' and x.shape[2] > 1:
        # Frame 0 passes through; then an unpadded stride-2 conv over all frames.
        y = F.conv3d(x, r.time_conv.weight, r.time_conv.bias, stride=(2, 1, 1))
        x = torch.cat([x[:, :, :1], y], dim=2)
    return x


def _stack_full(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, ResidualBlock):
            x = _res_full(layer, x)
        elif isinstance(layer, Resample):
            x = _resample_full(layer, x)
        else:  # AttentionBlock: per frame, no time mixing
            x = layer(x)
    return x


def _head_full(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return _conv_full(head[2], F.silu(head[0](x)))


def _decode_full(model: WanVAE_, z: torch.Tensor) -> torch.Tensor:
    x = _conv_full(model.conv2, z)
    d = model.decoder
    x = _conv_full(d.conv1, x)
    x = _stack_full(d.middle, x)
    x = _stack_full(d.upsamples, x)
    return _head_full(d.head, x)


def _encode_full(model: WanVAE_, x: torch.Tensor) -> torch.Tensor:
    x = x[:, :, :1 + 4 * ((x.shape[2] - 1) // 4)]
    e = model.encoder
    x = _conv_full(e.conv1, x)
    x = _stack_full(e.downsamples, x)
    x = _stack_full(e.middle, x)
    x = _head_full(e.head, x)
    return _conv_full(model.conv1, x)[:, :model.z_dim]


def test_chunked_decode_matches_whole_sequence(tiny):
    z = _randn(1, 16, 4, 2, 3, seed=4)
    with torch.no_grad():
        chunked = tiny.model.decode(z, [0.0, 1.0])
        whole = _decode_full(tiny.model, z)
    assert chunked.shape == whole.shape == (1, 3, 13, 16, 24)
    scale = whole.abs().max().item()
    assert torch.allclose(chunked, whole, atol=1e-5 * scale, rtol=0), (
        (chunked - whole).abs().max().item(), scale)


def test_chunked_encode_matches_whole_sequence(tiny):
    x = _randn(1, 3, 13, 16, 24, seed=5).clamp(-1, 1)
    with torch.no_grad():
        chunked = tiny.model.encode(x, [0.0, 1.0])
        whole = _encode_full(tiny.model, x)
    assert chunked.shape == whole.shape == (1, 16, 4, 2, 3)
    scale = whole.abs().max().item()
    assert torch.allclose(chunked, whole, atol=1e-5 * scale, rtol=0), (
        (chunked - whole).abs().max().item(), scale)


# --------------------------------------------------------------------------------------------
# Wrapper: frame arithmetic, causality, normalisation, clamp, precision
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('t_latent', [1, 2, 3, 5])
def test_decode_frame_arithmetic(tiny, t_latent):
    out = tiny.decode([_randn(16, t_latent, 2, 3, seed=t_latent)])
    assert isinstance(out, list) and len(out) == 1
    assert out[0].shape == (3, 1 + 4 * (t_latent - 1), 16, 24)
    assert out[0].dtype == torch.float32


@pytest.mark.parametrize('frames,latent_frames', [(1, 1), (5, 2), (9, 3), (11, 3)])
def test_encode_frame_arithmetic(tiny, frames, latent_frames):
    out = tiny.encode([_randn(3, frames, 16, 24, seed=frames).clamp(-1, 1)])
    assert out[0].shape == (16, latent_frames, 2, 3)
    assert out[0].dtype == torch.float32


def test_encode_drops_trailing_frames(tiny):
    x = _randn(3, 11, 16, 24, seed=6).clamp(-1, 1)
    assert torch.equal(tiny.encode([x])[0], tiny.encode([x[:, :9]])[0])


def test_decode_is_causal(tiny):
    z = _randn(16, 5, 2, 3, seed=7)
    full = tiny.decode([z])[0]
    for k in range(1, 6):
        part = tiny.decode([z[:, :k]])[0]
        assert part.shape[1] == 1 + 4 * (k - 1)
        # Not bit-exact only because conv2 (1x1x1) runs over a different number of frames.
        assert torch.allclose(part, full[:, :part.shape[1]], atol=1e-5, rtol=0), k


def test_encode_is_causal(tiny):
    x = _randn(3, 13, 16, 24, seed=8).clamp(-1, 1)
    full = tiny.encode([x])[0]
    for k in range(1, 5):
        part = tiny.encode([x[:, :1 + 4 * (k - 1)]])[0]
        assert part.shape[1] == k
        assert torch.allclose(part, full[:, :k], atol=1e-5, rtol=0), k


def test_latent_constants(tiny):
    assert torch.equal(tiny.mean, torch.tensor(SPEC_MEAN, dtype=torch.float32))
    assert torch.equal(tiny.std, torch.tensor(SPEC_STD, dtype=torch.float32))
    assert tiny.mean.dtype == tiny.std.dtype == torch.float32
    assert torch.equal(tiny.scale[0], tiny.mean)
    assert torch.equal(tiny.scale[1], 1.0 / torch.tensor(SPEC_STD, dtype=torch.float32))


def test_encode_normalises_with_reciprocal(tiny):
    x = _randn(3, 5, 16, 24, seed=9).clamp(-1, 1)
    mean = torch.tensor(SPEC_MEAN).view(16, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(SPEC_STD)).view(16, 1, 1, 1)
    with torch.no_grad():
        mu = tiny.model.encode(x[None], [0.0, 1.0])[0]  # un-normalised μ
    assert torch.equal(tiny.encode([x])[0], (mu - mean) * inv_std)


def test_decode_unnormalises_by_dividing_by_reciprocal(tiny):
    z = _randn(16, 2, 2, 3, seed=10) * 3
    mean = torch.tensor(SPEC_MEAN).view(16, 1, 1, 1)
    std = torch.tensor(SPEC_STD).view(16, 1, 1, 1)
    divided = z / (1.0 / std) + mean
    multiplied = z * std + mean
    assert not torch.equal(divided, multiplied)  # the test can tell the two apart
    with torch.no_grad():
        expected = tiny.model.decode(divided[None], [0.0, 1.0])[0].clamp(-1, 1)
        other = tiny.model.decode(multiplied[None], [0.0, 1.0])[0].clamp(-1, 1)
    assert not torch.equal(expected, other)
    assert torch.equal(tiny.decode([z])[0], expected)


def test_decode_clamps_output():
    vae = Wan2_1_VAE(device='cpu', dim=8, random_init_seed=1)
    with torch.no_grad():
        vae.model.decoder.head[2].weight.mul_(20.0)  # push the raw output well outside [-1, 1]
        z = _randn(16, 2, 2, 3, seed=11)
        raw = vae.model.decode(z[None], vae.scale)[0]
    assert raw.abs().max() > 1.5
    out = vae.decode([z])[0]
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.equal(out, raw.clamp(-1, 1))


def test_cpu_ignores_enclosing_autocast(tiny):
    z = _randn(16, 2, 2, 3, seed=12)
    x = _randn(3, 5, 16, 24, seed=13).clamp(-1, 1)
    plain_dec, plain_enc = tiny.decode([z])[0], tiny.encode([x])[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dec, enc = tiny.decode([z])[0], tiny.encode([x])[0]
    assert dec.dtype == enc.dtype == torch.float32
    assert torch.equal(dec, plain_dec) and torch.equal(enc, plain_enc)


def test_lists_of_several_videos(tiny):
    zs = [_randn(16, 1, 2, 3, seed=14), _randn(16, 3, 3, 2, seed=15)]
    outs = tiny.decode(zs)
    assert [tuple(o.shape) for o in outs] == [(3, 1, 16, 24), (3, 9, 24, 16)]
    assert torch.equal(outs[1], tiny.decode([zs[1]])[0])  # no state leaks between videos


def test_random_init_is_deterministic(tiny):
    other = Wan2_1_VAE(device='cpu', dim=8, random_init_seed=0)
    for (n1, t1), (n2, t2) in zip(tiny.model.state_dict().items(),
                                  other.model.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / 'vae.pth'
    torch.save(tiny.model.state_dict(), path)
    loaded = Wan2_1_VAE(vae_pth=str(path), device='cpu', dim=8)
    for name, t in tiny.model.state_dict().items():
        got = loaded.model.state_dict()[name]
        assert got.device.type == 'cpu' and got.dtype == torch.float32
        assert torch.equal(got, t), name
    z = _randn(16, 3, 2, 3, seed=16)
    assert torch.equal(loaded.decode([z])[0], tiny.decode([z])[0])


def test_missing_checkpoint_names_path_and_builds_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('model built before the checkpoint was found')
    monkeypatch.setattr(vae2_1, 'build_on_meta', fail)
    missing = tmp_path / 'nope' / 'Wan2.1_VAE.pth'
    with pytest.raises(FileNotFoundError, match='Wan2.1_VAE.pth') as info:
        Wan2_1_VAE(vae_pth=str(missing), device='cpu', dim=8)
    assert str(missing) in str(info.value)


def test_checkpoint_with_wrong_key_or_shape(tiny, tmp_path):
    sd = dict(tiny.model.state_dict())
    sd['decoder.head.2.weightx'] = sd.pop('decoder.head.2.weight')
    bad_key = tmp_path / 'bad_key.pth'
    torch.save(sd, bad_key)
    with pytest.raises(CheckpointError, match='decoder.head.2.weight'):
        Wan2_1_VAE(vae_pth=str(bad_key), device='cpu', dim=8)
    good = tmp_path / 'dim8.pth'
    torch.save(tiny.model.state_dict(), good)
    with pytest.raises(CheckpointError, match='mis-shaped'):
        Wan2_1_VAE(vae_pth=str(good), device='cpu', dim=16)


def test_import_does_not_touch_cuda():
    code = ('import torch, wan.modules.vae2_1; '
            'assert not torch.cuda.is_initialized(); print("ok")')
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr


# --------------------------------------------------------------------------------------------
# Channels-last layout (Wan2_1_VAE.set_channels_last): same math, NDHWC memory
# --------------------------------------------------------------------------------------------

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _standard_strides(t: torch.Tensor, layout: torch.memory_format) -> tuple:
    return torch.empty(t.shape, memory_format=layout, device='meta').stride()


def _convs(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]


def _layout_of(conv: nn.Module) -> torch.memory_format:
    return torch.channels_last_3d if isinstance(conv, nn.Conv3d) else torch.channels_last


@pytest.fixture
def fresh() -> Wan2_1_VAE:
    """A tiny VAE of its own: set_channels_last rewrites the weights' layout."""
    return Wan2_1_VAE(device='cpu', dim=8, random_init_seed=0)


# 4 latent frames (both temporal upsamples run from their caches), odd latent sizes.
CL_LATENT = dict(shape=(16, 4, 3, 5), seed=30)
CL_VIDEO = dict(shape=(3, 13, 24, 40), seed=31)


def _cl_inputs():
    z = _randn(*CL_LATENT['shape'], seed=CL_LATENT['seed'])
    x = _randn(*CL_VIDEO['shape'], seed=CL_VIDEO['seed']).clamp(-1, 1)
    return z, x


def test_channels_last_matches_default(fresh):
    z, x = _cl_inputs()
    ref_dec, ref_enc = fresh.decode([z])[0], fresh.encode([x])[0]
    fresh.set_channels_last(True)
    assert fresh.channels_last is True
    dec, enc = fresh.decode([z])[0], fresh.encode([x])[0]
    assert dec.shape == ref_dec.shape == (3, 13, 24, 40)
    assert enc.shape == ref_enc.shape == (16, 4, 3, 5)
    # Callers get ordinary contiguous fp32 tensors back.
    assert dec.is_contiguous() and enc.is_contiguous()
    assert dec.dtype == enc.dtype == torch.float32
    assert _rel_err(dec, ref_dec) < 1e-5 and _rel_err(enc, ref_enc) < 1e-5


def test_channels_last_off_again_restores_default(fresh):
    z, x = _cl_inputs()
    ref_dec, ref_enc = fresh.decode([z])[0], fresh.encode([x])[0]
    weights = {n: p.clone() for n, p in fresh.model.named_parameters()}
    convs = _convs(fresh.model)
    assert fresh.channels_last is False
    fresh.set_channels_last(True)
    for conv in convs:
        # Standard channels-last strides, the 1x1(x1) kernels included (for those the
        # contiguous strides would also pass an is_contiguous(memory_format=...) check).
        assert conv.weight.stride() == _standard_strides(conv.weight, _layout_of(conv))
    fresh.decode([z])
    fresh.set_channels_last(False)
    assert fresh.channels_last is False
    for conv in convs:
        assert conv.weight.stride() == _standard_strides(conv.weight, torch.contiguous_format)
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert torch.equal(fresh.decode([z])[0], ref_dec)
    assert torch.equal(fresh.encode([x])[0], ref_enc)


def _channels_innermost(t: torch.Tensor) -> bool:
    """t stored channels-last. Only asked where it tells the layouts apart: C > 1 and
    H·W > 1, so that an NC(D)HW tensor has stride(1) = (T·)H·W > 1."""
    assert t.shape[1] > 1 and t.shape[-1] * t.shape[-2] > 1, tuple(t.shape)
    layout = torch.channels_last_3d if t.dim() == 5 else torch.channels_last
    return t.stride(1) == 1 and t.is_contiguous(memory_format=layout)


def _record_conv_inputs(vae: Wan2_1_VAE, monkeypatch) -> dict:
    """For every conv of the decode path (decoder and the latent conv2), whether the input
    reaching the module and the tensor handed to the kernel (after the cache cat and the
    padding) are channels-last, one entry per call.

    Kernel outputs follow cuDNN's rule, channels-last for a channels-last weight: on CPU a
    batch-1 conv3d returns NCDHW whatever its operands, which would hide what is tested here,
    namely that every op between the convs keeps the layout.
    """
    names = {conv: name for name, conv in vae.model.named_modules()
             if conv in _convs(vae.model.decoder) or name == 'conv2'}
    seen = {name: [] for name in names.values()}
    for conv, name in names.items():
        conv.register_forward_pre_hook(
            lambda m, args, _n=name: seen[_n].append(('input', _channels_innermost(args[0]))))

    for cls in (nn.Conv2d, nn.Conv3d):
        def conv_forward(self, x, weight, bias, _orig=cls._conv_forward):
            if self in names:
                seen[names[self]].append(('kernel', _channels_innermost(x)))
            layout = _layout_of(self)
            weight_cl = weight.stride() == _standard_strides(weight, layout)
            return _orig(self, x, weight, bias).contiguous(
                memory_format=layout if weight_cl else torch.contiguous_format)
        monkeypatch.setattr(cls, '_conv_forward', conv_forward)
    return seen


def _is_3x3(name: str, vae: Wan2_1_VAE) -> bool:
    conv = vae.model.get_submodule(name)
    return all(k == 3 for k in conv.kernel_size)


def test_channels_last_layout_kept_through_decode(fresh, monkeypatch):
    z, _ = _cl_inputs()
    seen = _record_conv_inputs(fresh, monkeypatch)
    fresh.set_channels_last(True)
    out = fresh.decode([z])[0]
    assert out.shape == (3, 13, 24, 40) and out.is_contiguous()
    spatial = [n for n in seen if _is_3x3(n, fresh)]
    # 3x3x3 causal convs: conv1, 2 per ResidualBlock (2 middle, 4 x 3 upsamples), head;
    # 3x3 per-frame convs: one per Resample.
    assert len(spatial) == 1 + 2 * (2 + 12) + 1 + 3
    for name, records in seen.items():
        kinds = {kind for kind, _ in records}
        assert kinds == {'input', 'kernel'}, name  # every conv ran
        assert all(ok for _, ok in records), (name, records)

    # The check tells the layouts apart: by default the same convs see NC(D)HW inputs.
    # (The attention proj, not checked here, reads its input channels-last in both.)
    fresh.set_channels_last(False)
    for records in seen.values():
        records.clear()
    fresh.decode([z])
    for name in spatial:
        assert seen[name] and not any(ok for _, ok in seen[name]), name
