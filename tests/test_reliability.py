"""Nothing lost, every error early and in one line (CPU).

- saves are atomic: a full disk, a dying or silently failing encoder, or Ctrl-C during the
  save leave nothing at the target and keep the frames in NAME.frames.npy;
- bad inputs (shift, steps, seed, frames, size, output path, encoder, attention backend, a
  task too large for the machine) are refused before any model is built;
- missing and damaged checkpoint files end as one `error:` line naming the file.

Most cases call `generate.main([...])` in-process (fast); a few run generate.py as a
subprocess to see exactly what a user sees.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import generate
import wan.text2video as t2v
import wan.utils.utils as wu
from wan.configs import WAN_CONFIGS
from wan.utils.checkpoint import (SAFETENSORS_INDEX, CheckpointError, check_checkpoint_dir,
                                  save_sharded_safetensors)
from wan.utils.validation import (GiB, UserError, check_device_fits, estimate_model_bytes,
                                  host_memory_bytes)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(REPO_ROOT, 'generate.py')
TINY = ['--task', 't2v-tiny', '--random_init']
FAST = ['--sample_steps', '1', '--frame_num', '5']


@pytest.fixture(autouse=True)
def _logging_restored(restore_logging):
    """Every test here may run a CLI (tests/conftest.py: restore_logging)."""


class StubPipe:
    """A pipeline that 'generates' a fixed smooth video, for save-path tests."""

    def generate(self, prompt, size, frame_num, **kw):
        t = torch.linspace(-1, 1, frame_num)[:, None, None]
        y = torch.linspace(-1, 1, size[1])[None, :, None]
        x = torch.linspace(-1, 1, size[0])[None, None, :]
        ones = torch.ones(frame_num, size[1], size[0])
        return torch.stack([x * t * ones, y * ones, x * y * ones])


def stub_frames(frame_num=5, size=(128, 64)):
    video = StubPipe().generate('', size, frame_num)
    return wu.video_to_uint8_frames(video[None], nrow=1)


class FakeWriter:
    """Stands in for the ffmpeg writer: writes bytes to its file, then raises `error` at the
    third frame (or, with error=None, finishes without complaint having written `data`)."""

    def __init__(self, path, error=None, data=b'partial'):
        self.path, self.error, self.count = path, error, 0
        with open(path, 'wb') as f:
            f.write(data)

    def append_data(self, frame):
        self.count += 1
        if self.error is not None and self.count == 3:
            raise self.error

    def close(self):
        pass


def use_writer(monkeypatch, **kw):
    monkeypatch.setattr(wu, 'open_video_writer', lambda path, fps: FakeWriter(path, **kw))


def enospc():
    return OSError(errno.ENOSPC, 'No space left on device')


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith('error:')]


def assert_one_error(capsys, *fragments):
    """Exactly one `error:` line on stderr, holding every fragment; no traceback anywhere."""
    out, err = capsys.readouterr()
    lines = error_lines(err)
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert 'Traceback' not in out + err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# atomic saves (wan.utils.utils)
# ---------------------------------------------------------------------------------------------

def test_successful_save_leaves_only_the_video(tmp_path):
    target = tmp_path / 'v.mkv'
    assert wu.write_video_frames(stub_frames(), target, 16) == str(target)
    assert os.listdir(tmp_path) == ['v.mkv']
    assert wu.count_video_frames(str(target)) == 5


@pytest.mark.parametrize('error', [enospc(), OSError('encoder crashed'), KeyboardInterrupt()],
                         ids=['full-disk', 'encoder-error', 'ctrl-c'])
def test_failed_save_keeps_frames_and_nothing_partial(tmp_path, monkeypatch, error):
    use_writer(monkeypatch, error=error)
    video = StubPipe().generate('', (128, 64), 9)
    target = tmp_path / 'v.mp4'
    expected = (wu.VideoSaveInterrupted if isinstance(error, KeyboardInterrupt)
                else wu.VideoSaveError)
    with pytest.raises(expected) as info:
        wu.save_video(video[None], save_file=str(target), fps=16, nrow=1)
    kept = tmp_path / 'v.frames.npy'
    assert os.listdir(tmp_path) == ['v.frames.npy']  # no target, no temporary file
    assert info.value.frames_path == str(kept) and str(kept) in str(info.value)
    frames = np.load(kept)
    assert frames.dtype == np.uint8 and frames.shape == (9, 64, 128, 3)
    assert np.array_equal(frames, wu.video_to_uint8_frames(video[None], nrow=1))
    if isinstance(error, KeyboardInterrupt):
        assert isinstance(info.value, KeyboardInterrupt)  # still an interrupt for callers


def test_silently_broken_encoder_output_is_caught(tmp_path, monkeypatch):
    """ffmpeg on a full disk exits without an error and leaves a cut-off file: the frame
    count check catches it."""
    good = tmp_path / 'good.mp4'
    wu.write_video_frames(stub_frames(9), good, 16)
    cut = good.read_bytes()[: good.stat().st_size // 3]
    good.unlink()
    use_writer(monkeypatch, data=cut)
    with pytest.raises(wu.VideoSaveError, match='frames are kept'):
        wu.write_video_frames(stub_frames(9), tmp_path / 'v.mp4', 16)
    assert os.listdir(tmp_path) == ['v.frames.npy']


def test_existing_file_untouched_by_failed_save(tmp_path, monkeypatch):
    target = tmp_path / 'v.mp4'
    target.write_bytes(b'the previous video')
    use_writer(monkeypatch, error=enospc())
    with pytest.raises(wu.VideoSaveError):
        wu.write_video_frames(stub_frames(), target, 16)
    assert target.read_bytes() == b'the previous video'


def test_frames_go_to_temp_folder_when_target_folder_cannot_take_them(tmp_path, monkeypatch):
    use_writer(monkeypatch, error=enospc())
    temp = tmp_path / 'tmp'
    temp.mkdir()
    monkeypatch.setattr(wu.tempfile, 'tempdir', str(temp))
    monkeypatch.setattr(wu, 'frames_fallback_path',
                        lambda p: str(tmp_path / 'gone' / 'v.frames.npy'))
    with pytest.raises(wu.VideoSaveError) as info:
        wu.write_video_frames(stub_frames(), tmp_path / 'v.mp4', 16)
    assert info.value.frames_path == str(temp / 'v.frames.npy')
    assert np.array_equal(np.load(temp / 'v.frames.npy'), stub_frames())


@pytest.mark.parametrize('name,exc,fragment', [
    ('vnoext', wu.VideoTargetError, 'no file extension'),
    ('v.webm', wu.VideoTargetError, "unknown video extension '.webm'"),
    ('missing/v.mp4', FileNotFoundError, 'does not exist'),
    ('.', wu.VideoTargetError, 'is a directory'),
])
def test_video_target_checks(tmp_path, name, exc, fragment):
    with pytest.raises(exc, match=fragment):
        wu.check_video_target(tmp_path / name)
    with pytest.raises(exc):  # save_video refuses before encoding anything
        wu.save_video(torch.zeros(3, 1, 16, 16), save_file=str(tmp_path / name))
    assert not (tmp_path / 'vnoext').exists()


def test_missing_encoder_detected(monkeypatch, tmp_path):
    import imageio_ffmpeg

    def not_found():
        raise RuntimeError('No ffmpeg exe could be found.')

    monkeypatch.setattr(imageio_ffmpeg, 'get_ffmpeg_exe', not_found)
    with pytest.raises(wu.VideoTargetError, match='no video encoder.*ffmpeg'):
        wu.check_video_target(tmp_path / 'v.mp4')
    monkeypatch.setitem(sys.modules, 'imageio_ffmpeg', None)  # not installed
    with pytest.raises(wu.VideoTargetError, match='imageio_ffmpeg is not installed'):
        wu.find_ffmpeg()


# ---------------------------------------------------------------------------------------------
# the save in the CLI
# ---------------------------------------------------------------------------------------------

def test_cli_full_disk_after_real_generation(tmp_path, monkeypatch, capsys):
    """The tiny pipeline generates for real; the disk fills during the save."""
    use_writer(monkeypatch, error=enospc())
    target = tmp_path / 'v.mp4'
    assert generate.main(TINY + FAST + ['--save_file', str(target)]) == 1
    line = assert_one_error(capsys, str(target), 'No space left on device',
                            str(tmp_path / 'v.frames.npy'))
    assert 'Finished.' not in line
    assert os.listdir(tmp_path) == ['v.frames.npy']
    frames = np.load(tmp_path / 'v.frames.npy')
    assert frames.shape == (5, 64, 128, 3) and frames.std() > 0


def test_cli_interrupt_during_save(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, 'build_pipeline', lambda *a, **k: StubPipe())
    use_writer(monkeypatch, error=KeyboardInterrupt())
    target = tmp_path / 'v.mp4'
    assert generate.main(TINY + FAST + ['--save_file', str(target)]) == 130
    assert_one_error(capsys, 'interrupted', str(tmp_path / 'v.frames.npy'))
    assert os.listdir(tmp_path) == ['v.frames.npy']
    assert np.array_equal(np.load(tmp_path / 'v.frames.npy'), stub_frames())


def test_cli_interrupt_during_generation(tmp_path, monkeypatch, capsys):
    class Interrupted:
        def generate(self, *a, **k):
            raise KeyboardInterrupt

    monkeypatch.setattr(generate, 'build_pipeline', lambda *a, **k: Interrupted())
    assert generate.main(TINY + ['--save_file', str(tmp_path / 'v.mp4')]) == 130
    assert_one_error(capsys, 'interrupted')
    assert os.listdir(tmp_path) == []


def test_cli_missing_encoder_refused_before_build(tmp_path, monkeypatch, capsys,
                                                  no_model_build):
    import imageio_ffmpeg

    def not_found():
        raise RuntimeError('No ffmpeg exe could be found.')

    monkeypatch.setattr(imageio_ffmpeg, 'get_ffmpeg_exe', not_found)
    assert generate.main(TINY + ['--save_file', str(tmp_path / 'v.mp4')]) == 1
    assert_one_error(capsys, '--save_file', 'no video encoder')
    assert os.listdir(tmp_path) == []


def test_prompt_file_keeps_the_extension(tmp_path, monkeypatch):
    import generate_optimized
    monkeypatch.setattr(generate, 'build_pipeline', lambda *a, **k: StubPipe())
    prompts = tmp_path / 'p.txt'
    prompts.write_text('one\ntwo\n')
    out = tmp_path / 'out'
    out.mkdir()
    assert generate_optimized.main(TINY + FAST + ['--prompt_file', str(prompts),
                                                  '--save_file', str(out / 'v.mkv')]) == 0
    assert sorted(os.listdir(out)) == ['v_000.mkv', 'v_001.mkv']


# ---------------------------------------------------------------------------------------------
# inputs checked before anything is built
# ---------------------------------------------------------------------------------------------

BAD_ARGS = [
    (['--sample_shift', '-1'], ['--sample_shift', '> 0', '-1']),
    (['--sample_shift', '0'], ['--sample_shift', '> 0']),
    (['--sample_shift', 'nan'], ['--sample_shift', 'finite']),
    (['--sample_steps', '0'], ['--sample_steps', '>= 1']),
    (['--sample_steps', '100'], ['--sample_steps 100', '--sample_shift 12', 'at most 88']),
    (['--sample_steps', '120', '--sample_solver', 'dpm++'], ['dpm++', 'at most 101']),
    (['--sample_steps', '30', '--sample_shift', '100'], ['--sample_shift 100', 'at most 11']),
    (['--base_seed', str(2**64)], ['--base_seed', str(2**64), '2**63-1']),
    (['--base_seed', str(2**63)], ['--base_seed', '2**63-1']),
    (['--frame_num', '-3'], ['--frame_num', 'positive', '-3', 'nearest valid: 1']),
    (['--frame_num', '0'], ['--frame_num', 'positive']),
    (['--frame_num', '10'], ['4n+1', '9 or 13']),
    (['--size', '1280*720'], ['1280*720', 't2v-tiny', '128*64']),
    (['--save_file', '{tmp}/vnoext'], ['--save_file', 'vnoext', 'no file extension', '.mp4']),
    (['--save_file', '{tmp}/v.webm'], ['--save_file', '.webm']),
]


@pytest.mark.parametrize('extra,fragments', BAD_ARGS, ids=[' '.join(a) for a, _ in BAD_ARGS])
def test_bad_input_refused_before_build(tmp_path, capsys, no_model_build, extra, fragments):
    extra = [a.replace('{tmp}', str(tmp_path)) for a in extra]
    if '--save_file' not in extra:
        extra += ['--save_file', str(tmp_path / 'v.mp4')]
    assert generate.main(TINY + extra) == 1
    fragments = [f.replace('{tmp}', str(tmp_path)) for f in fragments]
    assert_one_error(capsys, *fragments)
    assert os.listdir(tmp_path) == []


def test_largest_valid_seed_and_steps_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(generate, 'build_pipeline', lambda *a, **k: StubPipe())
    target = tmp_path / 'v.mp4'
    assert generate.main(TINY + FAST + ['--base_seed', str(2**63 - 1),
                                        '--sample_steps', '88', '--save_file', str(target)]) == 0
    assert os.listdir(tmp_path) == ['v.mp4']


def test_size_choices_are_only_sizes_a_task_accepts():
    from wan.configs import SUPPORTED_SIZES
    parser = generate._parser()
    for size in ('704*1280', '1280*704', '1024*704', '704*1024'):
        with pytest.raises(SystemExit):
            parser.parse_args(['--size', size])
    choices = next(a.choices for a in parser._actions if a.dest == 'size')
    assert set(choices) == set(SUPPORTED_SIZES['t2v-A14B']) | set(SUPPORTED_SIZES['t2v-tiny'])


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU refusal needs a machine '
                                                      'without CUDA')
def test_attention_backend_checked_before_build(tmp_path, capsys, no_model_build):
    import generate_optimized
    assert generate_optimized.main(TINY + ['--attention', 'fa3', '--no-compile',
                                           '--save_file', str(tmp_path / 'v.mp4')]) == 1
    assert_one_error(capsys, '--attention fa3', 'CUDA', 'sdpa')


def test_debug_shows_the_traceback(tmp_path, capsys, no_model_build):
    args = TINY + ['--sample_shift', '-1', '--save_file', str(tmp_path / 'v.mp4')]
    assert generate.main(args) == 1
    out, err = capsys.readouterr()
    assert 'Traceback' not in out + err
    assert generate.main(args + ['--debug']) == 1
    out, err = capsys.readouterr()
    assert len(error_lines(err)) == 1 and 'Traceback' in out and 'check_shift' in out


# ---------------------------------------------------------------------------------------------
# the Python API checks the same generation arguments
# ---------------------------------------------------------------------------------------------

class FailOnAnyStage:
    def stage_started(self, name, info):
        raise AssertionError(f'stage {name} started before the arguments were checked')

    def stage_finished(self, name, info):
        pass


@pytest.mark.parametrize('override,fragment', [
    (dict(shift=-1.0), 'shift must be'),
    (dict(shift=0.0), 'shift must be'),
    (dict(sampling_steps=0), 'sampling_steps must be'),
    (dict(sampling_steps=100), 'sampling_steps 100 at shift 12 gives repeated'),
    (dict(seed=2**64), 'seed must be'),
    (dict(frame_num=-3), 'frame_num must be a positive'),
    (dict(frame_num=8), 'nearest valid: 5 or 9'),
    (dict(size=(120, 64)), 'size must be'),
    (dict(size=(0, 64)), 'size must be'),
])
def test_api_generate_checks_arguments_first(tiny_pipe, override, fragment):
    kw = dict(size=(128, 64), frame_num=5, shift=12.0, sampling_steps=2, seed=1)
    kw.update(override)
    guard = tiny_pipe.add_observer(FailOnAnyStage())
    try:
        with pytest.raises(ValueError, match=fragment):
            tiny_pipe.generate('a fox', **kw)
    finally:
        tiny_pipe.remove_observer(guard)


# ---------------------------------------------------------------------------------------------
# a task too large for the machine
# ---------------------------------------------------------------------------------------------

def _param_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_memory_estimate_matches_the_built_models(tiny_pipe, tiny_cfg):
    est = estimate_model_bytes(tiny_cfg)
    assert est['low_noise_model'] == _param_bytes(tiny_pipe.low_noise_model)
    assert est['high_noise_model'] == _param_bytes(tiny_pipe.high_noise_model)
    assert est['t5'] == _param_bytes(tiny_pipe.text_encoder.model)
    assert est['vae'] == _param_bytes(tiny_pipe.vae.model)
    need = sum(est.values())
    check_device_fits(tiny_cfg, 't2v-tiny', 'cpu', host_memory=need)
    with pytest.raises(UserError, match='t2v-tiny on a CPU'):
        check_device_fits(tiny_cfg, 't2v-tiny', 'cpu', host_memory=need - 1)
    check_device_fits(tiny_cfg, 't2v-tiny', 'cuda', host_memory=0)  # placement decides there


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for machines without '
                                                      'CUDA')
def test_a14b_on_cpu_refused_early(tmp_path, capsys, no_model_build):
    est = estimate_model_bytes(WAN_CONFIGS['t2v-A14B'])
    assert 50 * GiB < est['low_noise_model'] < 56 * GiB  # ~57 GB of fp32 weights per expert
    if host_memory_bytes() >= sum(est.values()):
        pytest.skip('this machine could hold t2v-A14B on its CPU')
    assert generate.main(['--random_init', '--save_file', str(tmp_path / 'v.mp4')]) == 1
    assert_one_error(capsys, 't2v-A14B', f'{sum(est.values()) / GiB:.0f} GiB',
                     f'{est["low_noise_model"] / GiB:.1f} GiB', f'T5 {est["t5"] / GiB:.1f}',
                     'CUDA GPU', '--task t2v-tiny')
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# checkpoints: missing and damaged files
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_ckpt(released_ckpt, tmp_path):
    """A copy of the released-layout tiny checkpoint (tests/conftest.py), free to damage."""
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(released_ckpt, ckpt)
    return ckpt


def _shards(folder):
    index = json.loads((folder / SAFETENSORS_INDEX).read_text())
    return sorted(set(index['weight_map'].values()))


def _rewrite_expert(folder, mutate):
    """Write the expert again (sharded, with a consistent index) from a mutated state dict."""
    from safetensors.torch import load_file
    sd = {}
    for shard in _shards(folder):
        sd.update(load_file(str(folder / shard)))
        (folder / shard).unlink()
    mutate(sd)
    save_sharded_safetensors(sd, str(folder), max_shard_bytes=200_000)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


HIGH = 'high_noise_model'
# (damage, file the message must name, found before any model is built)
DAMAGE = {
    'missing-shard': (lambda c: (c / HIGH / _shards(c / HIGH)[-1]).unlink(),
                      lambda c: c / HIGH / _shards(c / HIGH)[-1], True),
    'truncated-shard': (lambda c: truncate(c / HIGH / _shards(c / HIGH)[0]),
                        lambda c: c / HIGH / _shards(c / HIGH)[0], True),
    'garbage-shard': (lambda c: (c / HIGH / _shards(c / HIGH)[1]).write_bytes(b'\x07' * 5000),
                      lambda c: c / HIGH / _shards(c / HIGH)[1], True),
    'truncated-t5-pth': (lambda c: truncate(c / 'models_t5_umt5-xxl-enc-bf16.pth', 0.9),
                         lambda c: c / 'models_t5_umt5-xxl-enc-bf16.pth', True),
    'truncated-vae-pth': (lambda c: truncate(c / 'Wan2.1_VAE.pth'),
                          lambda c: c / 'Wan2.1_VAE.pth', True),
    'garbage-vae-pth': (lambda c: (c / 'Wan2.1_VAE.pth').write_bytes(b'\x80\x02' * 500),
                        lambda c: c / 'Wan2.1_VAE.pth', True),
    'broken-config-json': (lambda c: (c / HIGH / 'config.json').write_text('{"dim": 64,'),
                           lambda c: c / HIGH / 'config.json', True),
    'broken-index-json': (lambda c: (c / HIGH / SAFETENSORS_INDEX).write_text('{"weight'),
                          lambda c: c / HIGH / SAFETENSORS_INDEX, True),
    'wrong-shape': (lambda c: _rewrite_expert(c / HIGH, lambda sd: sd.__setitem__(
                        'head.head.bias', torch.zeros(3))), lambda c: c / HIGH, False),
    'unexpected-tensor': (lambda c: _rewrite_expert(c / HIGH, lambda sd: sd.__setitem__(
                              'blocks.9.extra', torch.zeros(1))), lambda c: c / HIGH, False),
    'missing-tensor': (lambda c: _rewrite_expert(c / HIGH, lambda sd: sd.pop('head.head.bias')),
                       lambda c: c / HIGH, False),
    't5-wrong-shape': (lambda c: torch.save(
        {k: (torch.zeros(2) if k.endswith('norm.weight') else v) for k, v in torch.load(
            c / 'models_t5_umt5-xxl-enc-bf16.pth').items()}, c / 'models_t5_umt5-xxl-enc-bf16.pth'),
        lambda c: c / 'models_t5_umt5-xxl-enc-bf16.pth', False),
}


@pytest.mark.parametrize('case', list(DAMAGE))
def test_damaged_checkpoint_is_one_line_naming_the_file(case, tiny_ckpt, tmp_path, capsys,
                                                        monkeypatch, request):
    damage, named, early = DAMAGE[case]
    expected_name = str(named(tiny_ckpt))  # before the damage (a shard may be removed)
    damage(tiny_ckpt)
    if early:
        request.getfixturevalue('no_model_build')
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    rc = generate.main(['--task', 't2v-tiny', '--ckpt_dir', str(tiny_ckpt), *FAST,
                        '--save_file', str(out_dir / 'v.mp4')])
    assert rc == 1
    assert_one_error(capsys, expected_name)
    assert os.listdir(out_dir) == []


def test_missing_shard_found_by_the_api_before_any_model(tiny_ckpt, tiny_cfg, no_model_build):
    shard = _shards(tiny_ckpt / 'low_noise_model')[0]
    (tiny_ckpt / 'low_noise_model' / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        t2v.WanT2V(tiny_cfg, str(tiny_ckpt))


def test_intact_checkpoint_passes_the_check(tiny_ckpt, tiny_cfg):
    check_checkpoint_dir(tiny_cfg, str(tiny_ckpt))


def test_index_listing_a_tensor_its_shard_lacks(tiny_ckpt, tiny_cfg):
    index_path = tiny_ckpt / HIGH / SAFETENSORS_INDEX
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index['weight_map'].items()))
    other = next(s for s in _shards(tiny_ckpt / HIGH) if s != shard)
    index['weight_map'][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f'{other}.*lacks tensors.*{name}'):
        check_checkpoint_dir(tiny_cfg, str(tiny_ckpt))


# ---------------------------------------------------------------------------------------------
# what a user sees (subprocesses)
# ---------------------------------------------------------------------------------------------

def run_cli(args, cwd, env=None):
    proc = subprocess.run([sys.executable, GENERATE] + args, cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_subprocess_save_file_without_extension(tmp_path):
    (tmp_path / 'out').mkdir()
    rc, out, err = run_cli(TINY + ['--save_file', 'out/vnoext'], cwd=tmp_path)
    assert rc == 1 and 'Traceback' not in out + err
    assert error_lines(err) == [f'error: --save_file: cannot write out/vnoext: no file '
                                f'extension; use one of {", ".join(wu.VIDEO_EXTENSIONS)}']
    assert 'Creating WanT2V' not in out and os.listdir(tmp_path / 'out') == []


@pytest.mark.slow
def test_subprocess_silent_encoder_failure(tmp_path):
    """An encoder that exits 0 but writes a broken file (ffmpeg on a full disk): exit 1 and
    the frames kept, where the old code printed Finished. and left the broken file."""
    fake = tmp_path / 'ffmpeg'
    fake.write_text('#!/bin/sh\n[ "$1" = "-version" ] && { echo "ffmpeg version 0"; exit 0; }\n'
                    'case "$*" in *"-f null"*) exit 1;; esac\n'
                    'cat > /dev/null; for last; do :; done; printf broken > "$last"; exit 0\n')
    fake.chmod(0o755)
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    rc, out, err = run_cli(TINY + FAST + ['--save_file', str(out_dir / 'v.mp4')], cwd=tmp_path,
                           env={'IMAGEIO_FFMPEG_EXE': str(fake)})
    assert rc == 1, out[-2000:] + err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and 'v.frames.npy' in lines[0] and 'Traceback' not in out + err
    assert 'Finished.' not in out
    assert os.listdir(out_dir) == ['v.frames.npy']
    assert np.load(out_dir / 'v.frames.npy').shape == (5, 64, 128, 3)


@pytest.mark.slow
def test_subprocess_truncated_shard(tiny_ckpt, tmp_path):
    shard = tiny_ckpt / 'low_noise_model' / _shards(tiny_ckpt / 'low_noise_model')[0]
    truncate(shard)
    rc, out, err = run_cli(['--task', 't2v-tiny', '--ckpt_dir', str(tiny_ckpt),
                            '--save_file', str(tmp_path / 'v.mp4')], cwd=tmp_path)
    assert rc == 1 and 'Traceback' not in out + err
    lines = error_lines(err)
    assert len(lines) == 1 and str(shard) in lines[0] and 'truncated' in lines[0]
    assert 'Creating WanT2V' not in out and not (tmp_path / 'v.mp4').exists()


def test_python_api_refuses_a14b_on_a_small_cpu_machine_before_building(monkeypatch):
    """WanT2V itself (not only the CLIs) refuses a task the machine cannot hold, before any
    model is built."""
    import wan.utils.validation as validation
    from wan.configs import WAN_CONFIGS
    monkeypatch.setattr(validation, 'host_memory_bytes', lambda: 64 * 2**30)
    monkeypatch.setattr(t2v, 'T5EncoderModel', lambda *a, **k: pytest.fail('T5 was built'))
    with pytest.raises(validation.UserError, match='weights alone need 118 GiB'):
        t2v.WanT2V(WAN_CONFIGS['t2v-A14B'], None, random_init=True, device='cpu')
