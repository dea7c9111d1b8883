"""Tests of wan.utils.utils: save_video (docs/PIPELINE.md#saving-the-video) and str2bool."""

from __future__ import annotations

import argparse
import os

import imageio
import numpy as np
import pytest
import torch

from wan.utils.utils import make_grid, save_video, str2bool, to_uint8, video_to_uint8_frames


def smooth_video(frames: int = 9, height: int = 64, width: int = 128) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1]: smooth gradients, different per channel, moving over time."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    red = 0.9 * torch.sin(1.5 * x + 2 * t) * torch.ones_like(y)
    green = 0.8 * torch.cos(1.2 * y - t) * torch.ones_like(x)
    blue = 0.7 * (x * y) + 0.2 * t
    return torch.stack([red, green, blue]).clamp(-1, 1)


def expected_uint8(video: torch.Tensor) -> np.ndarray:
    """(x + 1) / 2 * 255 truncated, as (T, H, W, C)."""
    frames = ((video.clamp(-1, 1) + 1) / 2 * 255).type(torch.uint8)
    return frames.permute(1, 2, 3, 0).numpy()


def read_video(path: str) -> tuple[np.ndarray, dict]:
    reader = imageio.get_reader(path, format='ffmpeg')
    try:
        meta = reader.get_meta_data()
        frames = np.stack([frame for frame in reader])
    finally:
        reader.close()
    return frames, meta


def test_save_video_round_trip(tmp_path):
    video = smooth_video()
    path = str(tmp_path / 'x.mp4')
    # As the pipeline calls it: batch of one, nrow=1, fps 16.
    returned = save_video(video[None], save_file=path, fps=16, nrow=1, normalize=True,
                          value_range=(-1, 1))
    assert returned == path and os.path.getsize(path) > 0

    frames, meta = read_video(path)
    assert frames.shape == (9, 64, 128, 3)  # T, H, W, C
    assert meta['fps'] == pytest.approx(16.0)
    assert meta['codec'] == 'h264'
    assert meta['pix_fmt'].startswith('yuv420p')
    # libx264 records its settings in the stream: imageio quality 8 is CRF 10.
    with open(path, 'rb') as handle:
        assert b'crf=10.0' in handle.read()

    error = np.abs(frames.astype(np.float64) - expected_uint8(video).astype(np.float64))
    assert error.mean() < 3.0, error.mean()


def test_save_video_accepts_unbatched_input_and_temp_file():
    video = smooth_video(frames=3, height=32, width=48)
    path = save_video(video, fps=16, suffix='.mp4')  # (C, T, H, W), no save_file
    try:
        assert path.endswith('.mp4') and os.path.getsize(path) > 0
        frames, _ = read_video(path)
        assert frames.shape == (3, 32, 48, 3)
    finally:
        os.remove(path)


def test_save_video_raises_on_failure(tmp_path):
    video = smooth_video(frames=2, height=16, width=16)
    with pytest.raises(FileNotFoundError):
        save_video(video[None], save_file=str(tmp_path / 'missing' / 'x.mp4'), fps=16)
    with pytest.raises(ValueError):
        save_video(torch.zeros(3, 16, 16), save_file=str(tmp_path / 'y.mp4'))


def test_uint8_conversion_truncates():
    values = torch.tensor([0.0, 0.5, 254.9 / 255, 254.999 / 255, 1.0, 1.9 / 255])
    assert to_uint8(values).tolist() == [0, 127, 254, 254, 255, 1]


def test_frames_normalize_clamp_and_truncate():
    # x = 0 maps to 127.5 -> 127 (rounding would give 128); out-of-range values are clamped.
    video = torch.tensor([0.0, -1.0, 1.0, 3.0, -2.0, 2 * 254.9 / 255 - 1]).reshape(1, 1, 1, 1, 6)
    video = video.expand(1, 3, 1, 1, 6)
    frames = video_to_uint8_frames(video, nrow=1)
    assert frames.shape == (1, 1, 6, 3) and frames.dtype == np.uint8
    assert frames[0, 0, :, 0].tolist() == [127, 0, 255, 255, 0, 254]
    # Other value ranges normalize with (x - low) / (high - low).
    frames = video_to_uint8_frames(torch.full((1, 3, 1, 1, 1), 0.25), value_range=(0, 0.5))
    assert frames[0, 0, 0].tolist() == [127, 127, 127]
    # normalize=False: only the clamp and x255 happen.
    frames = video_to_uint8_frames(torch.full((1, 3, 1, 1, 1), 0.5), normalize=False,
                                   value_range=(0, 1))
    assert frames[0, 0, 0].tolist() == [127, 127, 127]


def test_grid_layout():
    images = torch.stack([torch.full((3, 4, 5), float(k + 1)) for k in range(3)])
    single = make_grid(images[:1], nrow=8)
    assert torch.equal(single, images[0])  # no padding for a single image
    grid = make_grid(images, nrow=2)  # 2 columns, 2 rows, padding 2 with value 0
    assert grid.shape == (3, 2 * (4 + 2) + 2, 2 * (5 + 2) + 2)
    assert torch.equal(grid[:, 2:6, 2:7], images[0])
    assert torch.equal(grid[:, 2:6, 9:14], images[1])
    assert torch.equal(grid[:, 8:12, 2:7], images[2])
    assert grid[:, 8:12, 9:14].abs().sum() == 0  # empty cell
    assert grid[:, :2].abs().sum() == 0 and grid[:, :, 7:9].abs().sum() == 0
    # One channel is replicated to three.
    assert make_grid(torch.ones(1, 1, 2, 2)).shape == (3, 2, 2)


def test_batched_video_frames_are_grids():
    video = torch.stack([torch.full((3, 2, 4, 5), v) for v in (-1.0, 1.0)])  # B=2, T=2
    frames = video_to_uint8_frames(video, nrow=2)
    assert frames.shape == (2, 4 + 4, 2 * (5 + 2) + 2, 3)
    assert (frames[:, 2:6, 2:7] == 0).all() and (frames[:, 2:6, 9:14] == 255).all()


@pytest.mark.parametrize('text', ['yes', 'true', 't', 'y', '1', 'True', 'YES', 'T'])
def test_str2bool_true(text):
    assert str2bool(text) is True


@pytest.mark.parametrize('text', ['no', 'false', 'f', 'n', '0', 'False', 'NO', 'F'])
def test_str2bool_false(text):
    assert str2bool(text) is False


def test_str2bool_passthrough_and_errors():
    assert str2bool(True) is True and str2bool(False) is False
    for bad in ('maybe', '', '2', 'on', None, 1):
        with pytest.raises(argparse.ArgumentTypeError):
            str2bool(bad)
    parser = argparse.ArgumentParser()
    parser.add_argument('--flag', type=str2bool, default=None)
    assert parser.parse_args(['--flag', 'False']).flag is False
