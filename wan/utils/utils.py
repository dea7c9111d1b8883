"""Small utilities of the reference package: video saving and a boolean argparse type.

REFERENCE.md §8.2 describes the saving path reproduced here: clamp, per-frame grid of the
batch, normalize to [0, 1], x255 truncated to uint8, libx264 at imageio quality 8 (CRF 10,
yuv420p).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ['save_video', 'str2bool', 'video_to_uint8_frames', 'make_grid', 'to_uint8']

logger = logging.getLogger(__name__)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
              pad_value: float = 0.0) -> torch.Tensor:
    """Tile a batch of images (B, C, H, W) into one image (C, H', W'), ``nrow`` per row.

    Same layout as torchvision's make_grid (which the reference uses, but which this project
    does not require): a single image is returned as is, without padding; otherwise every
    tile is surrounded by ``padding`` pixels of ``pad_value``. One-channel images are
    replicated to three channels, as torchvision does.
    """
    if images.dim() != 4:
        raise ValueError(f'make_grid expects (B, C, H, W), got shape {tuple(images.shape)}')
    if images.size(1) == 1:
        images = images.expand(-1, 3, -1, -1)
    count, channels, height, width = images.shape
    if count == 1:
        return images[0]
    cols = min(nrow, count)
    rows = int(math.ceil(count / cols))
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, cols * cell_w + padding),
                           pad_value)
    for k in range(count):
        top = (k // cols) * cell_h + padding
        left = (k % cols) * cell_w + padding
        grid[:, top:top + height, left:left + width] = images[k]
    return grid


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] floats to uint8 by x255 and a cast, which truncates (254.9 -> 254).

    The reference truncates rather than rounds; rounding would shift most pixels by one level.
    """
    return (frames * 255).type(torch.uint8)


def video_to_uint8_frames(
    tensor: torch.Tensor,
    nrow: int = 8,
    normalize: bool = True,
    value_range: Sequence[float] = (-1, 1),
) -> np.ndarray:
    """Turn a video tensor (B, C, T, H, W) or (C, T, H, W) into uint8 frames (T, H', W', C).

    Values are clamped to ``value_range``; with ``normalize`` they are mapped to [0, 1] by
    (x - low) / max(high - low, 1e-5). The batch is tiled per frame with ``make_grid``.
    """
    if tensor.dim() == 4:
        # A single video without the batch axis: the reference would mis-read it, so add it.
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 5:
        raise ValueError(f'expected a video tensor (B, C, T, H, W) or (C, T, H, W), got shape '
                         f'{tuple(tensor.shape)}')
    low, high = min(value_range), max(value_range)
    tensor = tensor.clamp(low, high)
    if normalize:
        tensor = (tensor - low) / max(high - low, 1e-5)
    frames = torch.stack([make_grid(u, nrow=nrow) for u in tensor.unbind(2)], dim=1)
    frames = frames.permute(1, 2, 3, 0)  # (C, T, H', W') -> (T, H', W', C)
    return to_uint8(frames).cpu().numpy()


def save_video(
    tensor: torch.Tensor,
    save_file: Optional[Union[str, os.PathLike]] = None,
    fps: float = 30,
    suffix: str = '.mp4',
    nrow: int = 8,
    normalize: bool = True,
    value_range: Sequence[float] = (-1, 1),
) -> str:
    """Write a video tensor (B, C, T, H, W) or (C, T, H, W) to an H.264 file; return its path.

    The pipeline calls it as ``save_video(video[None], save_file, fps=16, nrow=1)`` with
    values in [-1, 1]. Encoding: ``imageio.get_writer(path, fps=fps, codec='libx264',
    quality=8)``, i.e. CRF 10 and yuv420p. With ``save_file=None`` a new temporary file with
    ``suffix`` is used.

    Unlike the reference, which only logs a failure, errors are logged and then re-raised so
    that callers (the CLI) can exit with a non-zero status instead of silently losing output.
    """
    import imageio  # imported lazily: only needed when a video is written

    if save_file is None:
        handle, save_file = tempfile.mkstemp(suffix=suffix)
        os.close(handle)
    save_file = os.fspath(save_file)
    try:
        frames = video_to_uint8_frames(tensor, nrow=nrow, normalize=normalize,
                                       value_range=value_range)
        writer = imageio.get_writer(save_file, fps=fps, codec='libx264', quality=8)
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    except Exception as exc:
        logger.error('save_video failed for %s: %s', save_file, exc)
        raise
    logger.debug('Saved %d frames to %s', len(frames), save_file)
    return save_file


def str2bool(v: Union[str, bool]) -> bool:
    """argparse type for booleans: yes/true/t/y/1 and no/false/f/n/0, any case.

    Raises argparse.ArgumentTypeError for anything else.
    """
    if isinstance(v, bool):
        return v
    if not isinstance(v, str):
        raise argparse.ArgumentTypeError(f'Boolean value expected (True/False), got {v!r}')
    lowered = v.lower()
    if lowered in ('yes', 'true', 't', 'y', '1'):
        return True
    if lowered in ('no', 'false', 'f', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f'Boolean value expected (True/False), got {v!r}')
