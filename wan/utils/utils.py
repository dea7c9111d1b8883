"""Small utilities of the reference package: video saving and a boolean argparse type.

The saving path of the reference, reproduced: clamp, per-frame grid of the
batch, normalize to [0, 1], x255 truncated to uint8, libx264 at imageio quality 8 (CRF 10,
yuv420p). Added: the write is atomic (temporary file, checked, renamed), and a failed write
keeps the frames losslessly beside the target (NAME.frames.npy).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import shutil
import subprocess
import tempfile
import uuid
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ['save_video', 'write_video_frames', 'check_video_target', 'find_ffmpeg',
           'frames_fallback_path', 'keep_frames', 'VideoTargetError', 'VideoSaveError',
           'VideoSaveInterrupted', 'VIDEO_EXTENSIONS', 'str2bool', 'video_to_uint8_frames',
           'make_grid', 'to_uint8']

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


# Containers that take the H.264 stream save_video writes (WebM only takes VP8/VP9/AV1).
VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.mov', '.avi')


class VideoTargetError(ValueError):
    """A video cannot be written to this path: unknown extension, no encoder, not writable."""


class VideoSaveError(RuntimeError):
    """Writing a video failed. Nothing is left at the target path; the frames are kept in
    `frames_path` (None if even that failed), and the message says where."""

    def __init__(self, message: str, frames_path: Optional[str] = None):
        super().__init__(message)
        self.frames_path = frames_path


class VideoSaveInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt during a save, after the frames were kept in `frames_path`."""

    def __init__(self, message: str, frames_path: Optional[str] = None):
        super().__init__(message)
        self.frames_path = frames_path


def find_ffmpeg() -> str:
    """The ffmpeg binary the video writer will run; VideoTargetError if there is none."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg
    except ImportError as exc:
        raise VideoTargetError(f'no video encoder: {exc.name} is not installed (pip install '
                               f'imageio imageio-ffmpeg)') from exc
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # RuntimeError: no binary found
        raise VideoTargetError(f'no video encoder: imageio-ffmpeg finds no ffmpeg binary '
                               f'({exc}); reinstall imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE')
    if not _ffmpeg_runs(exe):
        raise VideoTargetError(f'no video encoder: the ffmpeg binary {exe!r} does not run '
                               f'(check IMAGEIO_FFMPEG_EXE or reinstall imageio-ffmpeg)')
    return exe


@functools.lru_cache(maxsize=None)
def _ffmpeg_runs(exe: str) -> bool:
    try:
        return subprocess.run([exe, '-version'], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def check_video_target(path: Union[str, os.PathLike], probe: bool = False) -> None:
    """Raise before any work if a video cannot be written to `path`.

    FileNotFoundError: the folder does not exist; VideoTargetError: no or unknown extension,
    a directory, no encoder, or (with `probe`, by creating and removing a small file there)
    a folder that cannot be written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'cannot write {path}: folder {folder} does not exist')
    if os.path.isdir(path):
        raise VideoTargetError(f'cannot write {path}: it is a directory')
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_EXTENSIONS:
        what = f'unknown video extension {ext!r}' if ext else 'no file extension'
        raise VideoTargetError(f'cannot write {path}: {what}; use one of '
                               f'{", ".join(VIDEO_EXTENSIONS)}')
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise VideoTargetError(f'cannot write {path}: permission denied')
    if probe:
        try:
            handle, probe_path = tempfile.mkstemp(dir=folder, prefix='.wan-write-check-')
            os.close(handle)
            os.remove(probe_path)
        except OSError as exc:
            raise VideoTargetError(f'cannot write {path}: {exc.strerror or exc} in {folder}')
    find_ffmpeg()


def open_video_writer(path: str, fps: float):
    """The encoder save_video uses: imageio's ffmpeg writer, libx264 at quality 8 (CRF 10)."""
    import imageio
    return imageio.get_writer(path, format='FFMPEG', fps=fps, codec='libx264', quality=8)


def count_video_frames(path: str) -> int:
    """Frames in a written video, as ffmpeg decodes them; OSError if it cannot be read."""
    import imageio_ffmpeg
    try:
        return imageio_ffmpeg.count_frames_and_secs(path)[0] or 0
    except RuntimeError as exc:  # ffmpeg cannot decode it: its log is in the message
        logger.debug('%s', exc)
        raise OSError('the encoder left an unreadable file') from exc


def frames_fallback_path(save_file: Union[str, os.PathLike]) -> str:
    """Where save_video keeps the frames when the video cannot be written: NAME.frames.npy."""
    return os.path.splitext(os.fspath(save_file))[0] + '.frames.npy'


def keep_frames(frames: np.ndarray, save_file: str) -> Optional[str]:
    """Write `frames` losslessly (np.save) beside `save_file`, else in the temp folder.

    Atomic like the video itself; returns the path, or None when neither place takes them.
    """
    target = frames_fallback_path(save_file)
    for path in (target, os.path.join(tempfile.gettempdir(), os.path.basename(target))):
        tmp = f'{path}.{os.getpid()}.partial.npy'
        try:
            np.save(tmp, frames)
            os.replace(tmp, path)
            return path
        except BaseException as exc:  # a second Ctrl-C or a full disk: try the next place
            _remove_quietly(tmp)
            logger.error('could not keep the frames in %s: %s', path, exc)
            if not isinstance(exc, Exception):
                raise
    return None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _reason(exc: BaseException) -> str:
    """First line of an error (ffmpeg errors append its whole command and log)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _low_space_note(folder: str, needed: int) -> str:
    """' (disk full? N MiB free in FOLDER)' when less than `needed` bytes are free, else ''."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ''
    return f' (disk full? {free / 2**20:.1f} MiB free in {folder})' if free < needed else ''


def write_video_frames(frames: np.ndarray, save_file: Union[str, os.PathLike], fps: float) -> str:
    """Encode uint8 frames (T, H, W, C) to `save_file` atomically; return its path.

    The video is written to a temporary file in the target folder (same extension, so that
    the encoder picks the container), its frame count is checked by decoding it, and only
    then is it renamed onto `save_file`. On any failure (encoder error, full disk, Ctrl-C) the
    temporary file is removed, the target is left as it was, the frames are kept losslessly
    in NAME.frames.npy (see keep_frames) and VideoSaveError (VideoSaveInterrupted for Ctrl-C)
    is raised, naming both paths.
    """
    save_file = os.fspath(save_file)
    folder, name = os.path.split(os.path.abspath(save_file))
    ext = os.path.splitext(name)[1]
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial{ext}')
    try:
        check_video_target(save_file)  # checked again: the folder may have gone meanwhile
        writer = open_video_writer(tmp, fps)
        try:
            for frame in frames:
                writer.append_data(frame)
        except BaseException:
            try:  # the first error is the one to report
                writer.close()
            except Exception:
                pass
            raise
        writer.close()
        written = count_video_frames(tmp)
        if written != len(frames):
            raise OSError(f'the encoder wrote {written} of {len(frames)} frames')
        os.replace(tmp, save_file)
    except BaseException as exc:
        _remove_quietly(tmp)
        logger.debug('writing %s failed', save_file, exc_info=True)
        reason = _reason(exc) + _low_space_note(folder, frames.nbytes)
        kept = keep_frames(frames, save_file)
        where = (f'the frames are kept in {kept} (uint8 {"x".join(map(str, frames.shape))}, '
                 f'numpy.load)' if kept else 'the frames could not be kept either')
        if isinstance(exc, KeyboardInterrupt):
            raise VideoSaveInterrupted(f'interrupted while writing {save_file}; nothing was '
                                       f'left there; {where}', kept) from exc
        if not isinstance(exc, Exception):
            raise
        raise VideoSaveError(f'could not write the video {save_file}: {reason}; {where}',
                             kept) from exc
    logger.debug('Saved %d frames to %s', len(frames), save_file)
    return save_file


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
    values in [-1, 1]. Encoding: imageio's ffmpeg writer with ``fps=fps, codec='libx264',
    quality=8``, i.e. CRF 10 and yuv420p. With ``save_file=None`` a new temporary file with
    ``suffix`` is used.

    Unlike the reference, which only logs a failure, errors are raised: a path that cannot
    take a video (FileNotFoundError, VideoTargetError) before anything is encoded (the caller
    still holds the tensor), and a failed write as VideoSaveError after the frames were kept
    (write_video_frames: the write is atomic, nothing partial is left at `save_file`).
    """
    if save_file is None:
        handle, save_file = tempfile.mkstemp(suffix=suffix)
        os.close(handle)
    save_file = os.fspath(save_file)
    check_video_target(save_file)
    frames = video_to_uint8_frames(tensor, nrow=nrow, normalize=normalize,
                                   value_range=value_range)
    return write_video_frames(frames, save_file, fps)


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
