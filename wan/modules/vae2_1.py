"""The Wan2.1 video VAE (docs/VAE.md): a causal 3-D conv autoencoder with stride (4, 8, 8).

Video is processed in short chunks (encode: 1, 4, 4, ... frames; decode: one latent frame at a
time). Every causal temporal conv remembers the last frames of its input in a `FeatureCache`
slot, so that the next chunk sees the same temporal context a whole-sequence causal conv would
give it; the temporal resample convs have their own first-chunk rules (`Resample`). Module
paths, and so state-dict names, are those of upstream Wan2.2's wan/modules/vae2_1.py
(docs/VAE.md#module-tree), so the released `Wan2.1_VAE.pth` loads unchanged.

`Wan2_1_VAE.set_channels_last(True)` stores the conv weights and activations channels-last
(NDHWC); every op between the convs keeps that layout, so cuDNN runs its native NDHWC kernels
without transposing activations in and out. Same operations, same dtype.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checkpoint import load_tensors_, read_pth, require_file
from ..utils.random_init import build_on_meta, init_random_weights_

__all__ = [
    'Wan2_1_VAE', 'WanVAE_', 'Encoder3d', 'Decoder3d', 'ResidualBlock', 'AttentionBlock',
    'Resample', 'CausalConv3d', 'RMS_norm', 'Upsample', 'FeatureCache', 'count_causal_convs',
    'VAE_MEAN', 'VAE_STD', 'CACHE_T',
]

logger = logging.getLogger(__name__)

# How many trailing input frames a 3-tap causal conv needs from the previous chunk.
CACHE_T = 2

# Per-channel latent statistics of the released VAE (docs/VAE.md#latent-normalisation), exactly
# as published.
VAE_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
VAE_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]

# Marker left in an upsample3d slot by the first chunk, whose time conv is skipped. The next
# chunk then runs the time conv with zero padding instead of a cache (the reference's "Rep").
_FIRST_CHUNK_SEEN = 'Rep'

CacheEntry = Union[None, str, torch.Tensor]


class FeatureCache:
    """Temporal context carried from one chunk to the next, one slot per causal conv.

    Convs claim slots in call order; `start_chunk` rewinds the cursor so that each conv finds
    its own slot again on the next chunk. A slot holds None (nothing seen yet), the last input
    frames of its conv, or `_FIRST_CHUNK_SEEN` for an upsample3d time conv.
    """

    def __init__(self, num_slots: int) -> None:
        self.slots: List[CacheEntry] = [None] * num_slots
        self.cursor = 0

    def start_chunk(self) -> None:
        self.cursor = 0

    def claim(self) -> int:
        index = self.cursor
        self.cursor += 1
        return index


def count_causal_convs(module: nn.Module) -> int:
    """Number of CausalConv3d in `module`: the reference sizes its caches with this.

    It counts the 1x1x1 shortcuts too, which never use a slot, so some slots stay empty
    (encoder: 26 allocated, 24 used; decoder: 33 allocated, 32 used).
    """
    return sum(isinstance(m, CausalConv3d) for m in module.modules())


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time padding is all in front (2·pt frames), so no output sees the future.

    Height and width are padded symmetrically as usual. A cache of earlier frames, when given,
    replaces as many of the front zero frames.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        # F.pad order is (w_left, w_right, h_top, h_bottom, t_front, t_back).
        self._padding = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        wl, wr, ht, hb, front, _ = self._padding
        if not any(self._padding):
            return super().forward(x)  # 1x1x1: no padding, never a cache
        # 1x1x1 convs (no time padding) never take the cache.
        t_cache = cache_x.shape[2] if cache_x is not None and front > 0 else 0
        if t_cache > front:  # caches hold CACHE_T = 2 frames, front padding is 2 (3-tap)
            raise ValueError(f'cache of {t_cache} frames for a conv that reads {front}')
        # [zero frames | cache | x], zero-bordered in H and W, written into one buffer: the
        # values torch.cat + F.pad give, with one full-size copy of the activation fewer (at
        # 720p a decoder activation is ~2 GB) and in the input's memory layout.
        b, c, t, h, w = x.shape
        buf = torch.empty((b, c, front + t, h + ht + hb, w + wl + wr), dtype=x.dtype,
                          device=x.device, memory_format=_memory_format(x))
        z = front - t_cache
        buf[:, :, :z].zero_()
        body = buf[:, :, z:]
        body[:, :, :, :ht].zero_()
        body[:, :, :, ht + h:].zero_()
        body[:, :, :, ht:ht + h, :wl].zero_()
        body[:, :, :, ht:ht + h, wl + w:].zero_()
        inner = body[:, :, :, ht:ht + h, wl:wl + w]
        if t_cache:
            inner[:, :, :t_cache].copy_(cache_x)
        inner[:, :, t_cache:].copy_(x)
        return super().forward(buf)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of a 5-D activation: channels_last_3d when stored so (channels innermost),
    else contiguous (also where both coincide)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _frames_to_keep(x: torch.Tensor, old: CacheEntry) -> torch.Tensor:
    """The cache a conv leaves for the next chunk: the last CACHE_T frames of its input.

    A one-frame chunk is topped up with the last frame of the older cache, so that the next
    chunk still gets two frames of context whenever two exist.
    """
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and isinstance(old, torch.Tensor):
        keep = torch.cat([old[:, :, -1:].to(keep.device), keep], dim=2)
    return keep


def _cached_conv(conv: CausalConv3d, x: torch.Tensor,
                 cache: Optional[FeatureCache]) -> torch.Tensor:
    """Run a causal conv on a chunk with its cache slot: old cache in, new cache saved."""
    if cache is None:
        return conv(x)
    slot = cache.claim()
    old = cache.slots[slot]
    cache.slots[slot] = _frames_to_keep(x, old)
    return conv(x, old)


# Video <-> frames. For channels-last tensors the frame axis is split and merged in memory
# order (B, T, H, W, C): views with the standard channels-last strides. A plain reshape would
# give a size-1 dim (batch 1, a one-frame chunk) a smaller stride, legal but taken by ops that
# choose their output layout from the strides (F.pad, torch.cat, interpolate) for contiguous:
# they would copy to NCDHW and the next conv back.

def _to_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) video -> (B·T, C, H, W) frames, in the same layout."""
    b, c, t, h, w = x.shape
    if _memory_format(x) is torch.channels_last_3d:
        return x.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c).permute(0, 3, 1, 2)
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _to_video(y: torch.Tensor, b: int, layout: torch.memory_format) -> torch.Tensor:
    """(B·T, C, H, W) frames -> (B, C, T, H, W) video, channels_last_3d if `layout` says so
    (a view for channels-last frames), else as the reference reshapes."""
    n, c, h, w = y.shape
    if layout is torch.channels_last_3d:
        return y.permute(0, 2, 3, 1).reshape(b, n // b, h, w, c).permute(0, 4, 1, 2, 3)
    return y.reshape(b, n // b, c, h, w).transpose(1, 2)


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of a (B, C, T, H, W) video (layout kept)."""
    return _to_video(module(_to_frames(x)), x.shape[0], _memory_format(x))


class RMS_norm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gamma (an RMS norm whose only
    epsilon is F.normalize's 1e-12 clamp on the norm)."""

    def __init__(self, dim: int, channel_first: bool = True, images: bool = True,
                 bias: bool = False) -> None:
        super().__init__()
        broadcast_dims = (1, 1) if images else (1, 1, 1)
        shape = (dim, *broadcast_dims) if channel_first else (dim,)
        self.channel_first = channel_first
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        # The released VAE has no bias: keep it out of the state dict entirely.
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x, dim=1 if self.channel_first else -1) * self.scale * self.gamma
        return y if self.bias is None else y + self.bias


class Upsample(nn.Module):
    """Nearest-exact x2 spatial upsample, computed in fp32 (as the reference does) and cast
    back, so that bf16 inputs get the same pixel selection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode='nearest-exact').type_as(x)


class Resample(nn.Module):
    """Spatial x2 up/down-sampling per frame, optionally with a temporal x2 step.

    Modes: 'upsample2d', 'upsample3d', 'downsample2d', 'downsample3d' (or 'none').
    The temporal convs only run when a cache is given (chunked processing), as in the reference.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.dim = dim
        self.mode = mode
        if mode in ('upsample2d', 'upsample3d'):
            self.resample = nn.Sequential(Upsample(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ('downsample2d', 'downsample3d'):
            # Asymmetric right/bottom zero pad, then an unpadded stride-2 conv.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        elif mode == 'none':
            self.resample = nn.Identity()
        else:
            raise ValueError(f'unknown Resample mode {mode!r}')
        if mode == 'upsample3d':
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == 'downsample3d':
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1),
                                          padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: Optional[FeatureCache] = None) -> torch.Tensor:
        if self.mode == 'upsample3d' and cache is not None:
            x = self._double_frames(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == 'downsample3d' and cache is not None:
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        slot = cache.claim()
        old = cache.slots[slot]
        if old is None:
            # First chunk (the first latent frame): only mark the slot; the frame is not doubled.
            cache.slots[slot] = _FIRST_CHUNK_SEEN
            return x
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:
            # After the first chunk there is no real previous frame: the reference pads with
            # zeros (consistent with the zero padding used just below), not with frame 0.
            pad = old[:, :, -1:] if isinstance(old, torch.Tensor) else torch.zeros_like(keep)
            keep = torch.cat([pad.to(keep.device), keep], dim=2)
        y = self.time_conv(x) if old is _FIRST_CHUNK_SEEN else self.time_conv(x, old)
        cache.slots[slot] = keep
        # Channels [0:C] give frame 2t and [C:2C] frame 2t+1. Interleaved by two strided
        # copies into an output of y's layout (a stack + reshape would come out contiguous).
        b, _, t, h, w = y.shape
        out = torch.empty((b, self.dim, 2 * t, h, w), dtype=y.dtype, device=y.device,
                          memory_format=_memory_format(y))
        out[:, :, 0::2] = y[:, :self.dim]
        out[:, :, 1::2] = y[:, self.dim:]
        return out

    def _halve_frames(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        slot = cache.claim()
        old = cache.slots[slot]
        if old is None:
            # First chunk (frame 0 alone): passes through; its frames become the context.
            cache.slots[slot] = x.clone()
            return x
        keep = x[:, :, -1:].clone()
        # Unpadded stride-2 conv over [last frame before the chunk, chunk frames].
        y = self.time_conv(torch.cat([old[:, :, -1:].to(x.device), x], dim=2))
        cache.slots[slot] = keep
        return y


class ResidualBlock(nn.Module):
    """Two (RMS_norm, SiLU, causal 3x3x3 conv) stages plus a shortcut (1x1x1 conv if the
    width changes). The SiLUs work in place on the norm's fresh output (same values, one
    full-size activation less at the decode peak)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(inplace=True),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(inplace=True), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = (CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim
                         else nn.Identity())

    def forward(self, x: torch.Tensor, cache: Optional[FeatureCache] = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = _cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no time mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        x = self.norm(_to_frames(x))
        # (B·T, 3C, H·W) -> (B·T, 1 head, H·W, 3C), then q/k/v = channels [0:C], [C:2C], [2C:3C].
        # (Channels-last qkv is already in this order: the .contiguous() then copies nothing.)
        qkv = self.to_qkv(x).reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        x = self.proj(x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        # Back in the input's layout (the default one exactly as the reference reshapes).
        return _to_video(x, b, _memory_format(identity)) + identity


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim),
                         ResidualBlock(dim, dim, dropout))


class Encoder3d(nn.Module):
    """Video (3 channels) -> 2·z_dim channels (μ and logvar before the top-level conv1)."""

    def __init__(self, dim: int = 128, z_dim: int = 4, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2,
                 temperal_downsample: Sequence[bool] = (True, True, False),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        self.dim_mult = list(dim_mult)
        self.num_res_blocks = num_res_blocks
        self.temperal_downsample = list(temperal_downsample)
        dims = [dim * u for u in [1] + self.dim_mult]

        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(self.dim_mult) - 1:
                mode = 'downsample3d' if self.temperal_downsample[i] else 'downsample2d'
                blocks.append(Resample(out_dim, mode=mode))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1], dropout)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(inplace=True),
                                  CausalConv3d(dims[-1], z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Optional[FeatureCache] = None) -> torch.Tensor:
        x = _cached_conv(self.conv1, x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.head:
            x = _cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Decoder3d(nn.Module):
    """z_dim channels -> video (3 channels), x4 in time (with a cache) and x8 in space."""

    def __init__(self, dim: int = 128, z_dim: int = 4, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2,
                 temperal_upsample: Sequence[bool] = (False, True, True),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        self.dim_mult = list(dim_mult)
        self.num_res_blocks = num_res_blocks
        self.temperal_upsample = list(temperal_upsample)
        dims = [dim * u for u in [self.dim_mult[-1]] + self.dim_mult[::-1]]

        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        blocks: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            # Every Resample halves the width, so later stages start from half the width.
            if i > 0:
                in_dim = in_dim // 2
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(self.dim_mult) - 1:
                mode = 'upsample3d' if self.temperal_upsample[i] else 'upsample2d'
                blocks.append(Resample(out_dim, mode=mode))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(inplace=True),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Optional[FeatureCache] = None) -> torch.Tensor:
        x = _cached_conv(self.conv1, x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.upsamples:
            x = layer(x, cache)
        for layer in self.head:
            x = _cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


Scale = Sequence[Union[float, torch.Tensor]]


def _per_channel(value: Union[float, torch.Tensor], z_dim: int) -> Union[float, torch.Tensor]:
    return value.view(1, z_dim, 1, 1, 1) if isinstance(value, torch.Tensor) else value


class WanVAE_(nn.Module):
    """Encoder, decoder and the two 1x1x1 latent convs, with chunked encode/decode
    (docs/VAE.md#chunked-encode-and-decode)."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2,
                 temperal_downsample: Sequence[bool] = (False, True, True),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        self.dim_mult = list(dim_mult)
        self.num_res_blocks = num_res_blocks
        self.temperal_downsample = list(temperal_downsample)
        self.temperal_upsample = self.temperal_downsample[::-1]

        self.encoder = Encoder3d(dim, z_dim * 2, self.dim_mult, num_res_blocks,
                                 self.temperal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, self.dim_mult, num_res_blocks,
                                 self.temperal_upsample, dropout)
        self.encoder_cache_slots = count_causal_convs(self.encoder)
        self.decoder_cache_slots = count_causal_convs(self.decoder)
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget all temporal context (called before and after every encode/decode)."""
        self._enc_cache = FeatureCache(self.encoder_cache_slots)
        self._dec_cache = FeatureCache(self.decoder_cache_slots)

    def encode(self, x: torch.Tensor, scale: Scale) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised μ (B, z_dim, 1 + (T-1)//4, H/8, W/8)."""
        self.clear_cache()
        mu = self.conv1(self._encode_chunks(x)).chunk(2, dim=1)[0]  # logvar is unused
        mu = (mu - _per_channel(scale[0], self.z_dim)) * _per_channel(scale[1], self.z_dim)
        self.clear_cache()
        return mu

    def _encode_chunks(self, x: torch.Tensor) -> torch.Tensor:
        # Chunks: frame 0 alone, then 4 frames each; a trailing partial chunk is dropped, as
        # in the reference (T = 11 encodes frames 0..8 only).
        num_chunks = 1 + (x.shape[2] - 1) // 4
        outs = []
        for i in range(num_chunks):
            self._enc_cache.start_chunk()
            frames = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1):1 + 4 * i]
            outs.append(self.encoder(frames, self._enc_cache))
        return torch.cat(outs, dim=2)

    def decode(self, z: torch.Tensor, scale: Scale) -> torch.Tensor:
        """Normalised latent (B, z_dim, T', H', W') -> (B, 3, 1 + 4(T'-1), 8H', 8W'), unclamped."""
        self.clear_cache()
        # Divide by the stored reciprocal (not multiply by std) to match the reference bits.
        z = z / _per_channel(scale[1], self.z_dim) + _per_channel(scale[0], self.z_dim)
        out = self._decode_frames(self.conv2(z))
        self.clear_cache()
        return out

    def _decode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Run the decoder one latent frame at a time with the shared cache.

        Latent frame 0 gives 1 frame, each later one 4 (the first chunk skips the temporal
        upsampling). This loop is the decode hot path.
        """
        outs = []
        for i in range(x.shape[2]):
            self._dec_cache.start_chunk()
            outs.append(self.decoder(x[:, :, i:i + 1], self._dec_cache))
        return torch.cat(outs, dim=2)


def _video_vae(z_dim: int = 16, dim: int = 96) -> WanVAE_:
    """The Wan2.1 VAE topology (docs/VAE.md#hyper-parameters) at base width `dim` (96 for the
    released model)."""
    return WanVAE_(dim=dim, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True], dropout=0.0)


class Wan2_1_VAE:
    """Wan2.1 VAE wrapper: loads the checkpoint, holds the latent statistics, and encodes or
    decodes lists of videos.

    `dim` and `random_init_seed` are this project's extensions: a smaller base width for tests
    and the tiny config, and deterministic random weights instead of a checkpoint.
    """

    def __init__(self, z_dim: int = 16, vae_pth: str = 'cache/vae_step_411000.pth',
                 dtype: torch.dtype = torch.float, device: Union[str, int, torch.device] = 'cuda',
                 *, dim: int = 96, random_init_seed: Optional[int] = None,
                 source: Optional[Any] = None) -> None:
        if random_init_seed is None and source is None:
            # Fail on a missing file before allocating anything.
            require_file(vae_pth, 'Wan2.1 VAE checkpoint')
        self.dtype = dtype
        self.device = device
        self.z_dim = z_dim
        self.mean = torch.tensor(VAE_MEAN, dtype=dtype, device=device)
        self.std = torch.tensor(VAE_STD, dtype=dtype, device=device)
        self.scale = [self.mean, 1.0 / self.std]

        model = build_on_meta(lambda: _video_vae(z_dim=z_dim, dim=dim))
        if source is not None:
            # another checkpoint layout (wan/utils/formats.py): its names mapped to ours
            logger.info('loading Wan2.1 VAE from %s', source.describe())
            load_tensors_(model, source.iter_tensors(), source=source.path, device=device,
                          dtype=dtype, rename=source.rename, transform=source.transform(dtype))
        elif random_init_seed is None:
            logger.info('loading Wan2.1 VAE from %s', vae_pth)
            load_tensors_(model, read_pth(vae_pth).items(), source=vae_pth, device=device,
                          dtype=dtype)
        else:
            logger.info('Wan2.1 VAE (dim %d) with random weights, seed %d', dim,
                        random_init_seed)
            init_random_weights_(model, random_init_seed, device=device, dtype=dtype)
        self.model = model.eval().requires_grad_(False)
        self.channels_last = False

    def set_channels_last(self, enabled: bool) -> None:
        """Store the conv weights channels-last (enabled) or in the default layout (not).

        Conv3d weights become channels_last_3d, the per-frame Conv2d weights channels_last;
        encode/decode then feed channels_last_3d input. Same math and dtype: cuDNN runs its
        native NDHWC tensor-core kernels instead of transposing every activation.
        """
        for module in self.model.modules():
            # Per module: Module.to(memory_format=channels_last_3d) rejects the 4-D weights.
            if isinstance(module, nn.Conv3d):
                layout = torch.channels_last_3d
            elif isinstance(module, nn.Conv2d):
                layout = torch.channels_last
            else:
                continue
            # clone, not .contiguous(): a 1x1(x1) kernel counts as contiguous in both layouts,
            # so .contiguous() would keep its NCHW strides, and cuDNN would infer NCHW from them.
            module.weight.data = module.weight.data.clone(
                memory_format=layout if enabled else torch.contiguous_format)
        self.channels_last = enabled

    def _precision(self) -> contextlib.AbstractContextManager:
        """fp32 autocast on CUDA, as the reference (it overrides an enclosing bf16 region);
        elsewhere plain precision with any enclosing autocast switched off."""
        device_type = torch.device(self.device).type
        if device_type == 'cuda':
            return torch.amp.autocast('cuda', dtype=self.dtype)
        return torch.autocast(device_type, enabled=False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        # Without autocast to cast conv inputs, the input must already be in the weights' dtype.
        if torch.device(self.device).type != 'cuda':
            x = x.to(self.dtype)
        x = x.unsqueeze(0)
        if self.channels_last:
            # The layout the model's ops then keep all the way (one copy here).
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def encode(self, videos: List[torch.Tensor]) -> List[torch.Tensor]:
        """videos: list of (3, T, H, W) in [-1, 1] -> list of fp32 (z_dim, 1 + (T-1)//4, H/8, W/8)."""
        # .contiguous(): callers get the ordinary layout (a no-op unless channels_last).
        with self._precision():
            return [self.model.encode(self._prepare(u), self.scale).float().squeeze(0)
                    .contiguous() for u in videos]

    def decode(self, zs: List[torch.Tensor]) -> List[torch.Tensor]:
        """zs: list of (z_dim, T', H', W') -> list of fp32 (3, 1 + 4(T'-1), 8H', 8W') in [-1, 1]."""
        with self._precision():
            return [self.model.decode(self._prepare(u), self.scale).float().clamp_(-1, 1)
                    .squeeze(0).contiguous() for u in zs]
