"""generate.py and generate_optimized.py end to end, as subprocesses (README.md#cli-reference; upstream generate.py), on the
tiny config with random weights; plus the in-process pieces a subprocess cannot reach."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime

import imageio
import numpy as np
import pytest

# the CLIs run as subprocesses (a few seconds each)
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(REPO_ROOT, 'generate.py')
GENERATE_OPT = os.path.join(REPO_ROOT, 'generate_optimized.py')
TINY = ['--task', 't2v-tiny', '--random_init']
PROMPT = 'a red fox runs through the snow'


def run(args, script=GENERATE, cwd=None, timeout=300):
    """Run a CLI; returns (exit status, stdout + stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, script] + list(args), cwd=cwd or REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def read_video(path):
    reader = imageio.get_reader(str(path), 'ffmpeg')
    try:
        meta = reader.get_meta_data()
        frames = np.stack([frame for frame in reader])  # len(reader) is inf
    finally:
        reader.close()
    return frames, meta


def assert_ok(rc, out):
    assert rc == 0, out[-4000:]
    assert 'Finished.' in out


# ---------------------------------------------------------------------------------------------
# generate.py
# ---------------------------------------------------------------------------------------------

def test_generate_demo_writes_mp4(tmp_path):
    save = tmp_path / 'x.mp4'
    rc, out, _ = run(TINY + ['--prompt', PROMPT, '--save_file', str(save),
                             '--sample_steps', '4'])
    assert_ok(rc, out)
    for line in ('Creating WanT2V pipeline.', 'Generating video', 'Saving generated video to',
                 'offload_model is not specified, set to True'):
        assert line in out
    frames, meta = read_video(save)
    assert frames.shape == (9, 64, 128, 3)  # 4(T'-1)+1 frames, H=64, W=128
    assert meta['fps'] == 16
    assert tuple(meta['size']) == (128, 64)
    assert frames.std() > 1  # not a blank video


def test_default_output_name(tmp_path):
    prompt = 'a/b cat walks along the beach at sunset, warm light, slow camera pan'
    before = datetime.now().replace(microsecond=0)
    rc, out, _ = run(TINY + ['--prompt', prompt, '--sample_steps', '1', '--frame_num', '5'],
                     cwd=tmp_path)
    after = datetime.now()
    assert_ok(rc, out)
    files = os.listdir(tmp_path)
    assert len(files) == 1, files
    stem = prompt.replace(' ', '_').replace('/', '_')[:50]
    assert len(stem) == 50
    m = re.fullmatch(re.escape(f't2v-tiny_128*64_1_{stem}_') + r'(\d{8}_\d{6})\.mp4', files[0])
    assert m, files[0]
    stamp = datetime.strptime(m.group(1), '%Y%m%d_%H%M%S')
    assert before <= stamp <= after
    frames, _ = read_video(tmp_path / files[0])
    assert frames.shape == (5, 64, 128, 3)


BAD_INPUTS = [
    # (extra args, required fragments of the message)
    (TINY + ['--size', '1280*720'], ['1280*720', '128*64', '64*128', '128*128']),
    (TINY + ['--frame_num', '10'], ['4n+1', '9 or 13']),
    (['--task', 't2v-tiny'], ['--ckpt_dir']),
    (['--task', 't2v-tiny', '--ckpt_dir', '{tmp}/no_such_ckpt'], ['no_such_ckpt']),
    (TINY + ['--prompt', '  '], ['prompt', 'empty']),
    (TINY + ['--save_file', '{tmp}/missing_folder/x.mp4'], ['missing_folder']),
    (TINY + ['--save_file', '{tmp}'], ['is a directory']),
    (TINY + ['--image', 'x.png'], ['--image', 'not supported by this project']),
    (TINY + ['--use_prompt_extend'], ['--use_prompt_extend', 'not supported']),
    (['--task', 'i2v-A14B', '--random_init'], ['i2v-A14B', 'not supported']),
    (TINY + ['--ulysses_size', '2'], ['--ulysses_size', 'torchrun']),
    (TINY + ['--dit_fsdp'], ['--dit_fsdp', 'torchrun']),
    (TINY + ['--t5_fsdp'], ['--t5_fsdp', 'torchrun']),
    (TINY + ['--sample_steps', '0'], ['--sample_steps']),
    (TINY + ['--save_file', '{tmp}/x.unknownext'], ['--save_file', '.unknownext', '.mp4']),
]


@pytest.mark.parametrize('args,fragments', BAD_INPUTS,
                         ids=[' '.join(a[3:] if a[:3] == TINY else a) for a, _ in BAD_INPUTS])
def test_bad_input_fails_before_generation(tmp_path, args, fragments):
    args = [a.replace('{tmp}', str(tmp_path)) for a in args]
    if '--save_file' not in args:
        args += ['--save_file', str(tmp_path / 'out.mp4')]
    rc, out, seconds = run(args, cwd=tmp_path)
    assert rc != 0
    for frag in fragments:
        assert frag in out, (frag, out[-2000:])
    assert 'Traceback' not in out
    # rejected before any model is built or any step runs, and nothing is written
    assert 'Creating WanT2V' not in out and 'Generating video' not in out
    assert not any(p.is_file() for p in tmp_path.rglob('*'))
    assert seconds < 60


def test_unknown_size_rejected_by_parser(tmp_path):
    rc, out, _ = run(TINY + ['--size', '100*100'], cwd=tmp_path)
    assert rc == 2 and 'invalid choice' in out and '128*64' in out


def test_incomplete_checkpoint_dir(tmp_path):
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    rc, out, _ = run(['--task', 't2v-tiny', '--ckpt_dir', str(ckpt), '--save_file',
                      str(tmp_path / 'x.mp4')])
    assert rc == 1
    assert 'models_t5_umt5-xxl-enc-bf16.pth' in out and 'high_noise_model' in out
    assert 'Traceback' not in out and 'Generating video' not in out
    assert not (tmp_path / 'x.mp4').exists()


def test_failing_save_exits_nonzero_subprocess(tmp_path):
    """A save that fails for real (an encoder that dies): exit 1, one line, no video file,
    the frames kept beside the target."""
    fake = tmp_path / 'bin' / 'ffmpeg'
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = "-version" ] && { echo "ffmpeg version 0"; exit 0; }\n'
                    'for last; do :; done; printf partial > "$last"; exit 1\n')
    fake.chmod(0o755)
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    save = out_dir / 'x.mp4'
    proc = subprocess.run([sys.executable, GENERATE] + TINY + [
        '--save_file', str(save), '--sample_steps', '1', '--frame_num', '5'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, 'IMAGEIO_FFMPEG_EXE': str(fake)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and str(save) in errors[0] and 'x.frames.npy' in errors[0]
    assert 'Traceback' not in out and 'Finished.' not in out
    assert sorted(os.listdir(out_dir)) == ['x.frames.npy']
    assert np.load(out_dir / 'x.frames.npy').shape == (5, 64, 128, 3)


class FailingWriter:
    """Stands in for the ffmpeg writer: writes some bytes to its file, then raises `error`
    at the third frame."""

    def __init__(self, path, error):
        self.path, self.error, self.frames = path, error, 0
        with open(path, 'wb') as f:
            f.write(b'partial')

    def append_data(self, frame):
        self.frames += 1
        if self.frames == 3:
            raise self.error

    def close(self):
        pass


def test_save_output_failure_in_process(tmp_path, monkeypatch, restore_logging):
    import errno

    import torch

    import generate
    import wan.utils.utils as wu

    monkeypatch.setattr(wu, 'open_video_writer', lambda path, fps: FailingWriter(
        path, OSError(errno.ENOSPC, 'No space left on device')))
    video = torch.zeros(3, 5, 64, 128)
    save = tmp_path / 'out.mp4'
    args = generate._parser().parse_args(TINY + ['--save_file', str(save)])
    with pytest.raises(wu.VideoSaveError, match='No space left on device') as err:
        generate.save_output(video, args, 16)
    assert not save.exists()  # nothing partial at the target, no temporary file left
    assert sorted(os.listdir(tmp_path)) == ['out.frames.npy']
    assert err.value.frames_path == str(tmp_path / 'out.frames.npy')

    # a file that was there before is left as it was
    save.write_bytes(b'previous video')
    with pytest.raises(wu.VideoSaveError):
        generate.save_output(video, args, 16)
    assert save.read_bytes() == b'previous video'

    # generate.main returns non-zero when saving fails (no model: a stub pipeline)
    save.unlink()

    class StubPipe:
        def generate(self, prompt, size, frame_num, **kw):
            return torch.zeros(3, frame_num, size[1], size[0])

    monkeypatch.setattr(generate, 'build_pipeline', lambda *a, **k: StubPipe())
    assert generate.main(TINY + ['--save_file', str(save), '--frame_num', '5']) == 1
    assert not save.exists()


# ---------------------------------------------------------------------------------------------
# generate_optimized.py
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def optimized_runs(tmp_path_factory):
    """Two runs: --seed 5 with one prompt, and --base_seed 5 with a prompt file whose first
    prompt is the same."""
    d = tmp_path_factory.mktemp('opt')
    a = d / 'a.mp4'
    rc_a, out_a, _ = run(TINY + ['--prompt', PROMPT, '--sample_steps', '4', '--seed', '5',
                                 '--save_file', str(a)], script=GENERATE_OPT)
    pf = d / 'prompts.txt'
    pf.write_text(f'{PROMPT}\n\n  a blue whale sings in the deep ocean  \n', encoding='utf-8')
    b = d / 'b.mp4'
    rc_b, out_b, _ = run(TINY + ['--prompt_file', str(pf), '--sample_steps', '4',
                                 '--base_seed', '5', '--save_file', str(b)],
                         script=GENERATE_OPT)
    return dict(dir=d, a=a, rc_a=rc_a, out_a=out_a, rc_b=rc_b, out_b=out_b)


def test_optimized_demo(optimized_runs):
    r = optimized_runs
    assert_ok(r['rc_a'], r['out_a'])
    assert r['out_a'].count('Creating WanT2VOptimized pipeline.') == 1
    frames, meta = read_video(r['a'])
    assert frames.shape == (9, 64, 128, 3) and meta['fps'] == 16


def test_optimized_prompt_file_loads_once(optimized_runs):
    r = optimized_runs
    assert_ok(r['rc_b'], r['out_b'])
    assert r['out_b'].count('Creating WanT2VOptimized pipeline.') == 1
    assert r['out_b'].count('Generating video') == 2
    names = sorted(p.name for p in r['dir'].iterdir() if p.suffix == '.mp4')
    assert names == ['a.mp4', 'b_000.mp4', 'b_001.mp4']
    first, _ = read_video(r['dir'] / 'b_000.mp4')
    second, _ = read_video(r['dir'] / 'b_001.mp4')
    assert first.shape == second.shape == (9, 64, 128, 3)
    assert not np.array_equal(first, second)


def test_seed_alias_equals_base_seed(optimized_runs):
    r = optimized_runs
    assert r['rc_a'] == 0 and r['rc_b'] == 0
    a, _ = read_video(r['a'])
    b, _ = read_video(r['dir'] / 'b_000.mp4')
    assert np.array_equal(a, b)
    assert 'base_seed=5' in r['out_a'] and 'base_seed=5' in r['out_b']


def test_optimized_flags_parse():
    import generate_optimized as go
    p = go._parser()
    assert p.parse_args(['--no-offload']).no_offload is True
    assert p.parse_args(['--offload_model', 'True']).offload_model is True
    assert p.parse_args(['--offload_model', 'false']).offload_model is False
    assert p.parse_args([]).compile is True
    assert p.parse_args(['--no-compile']).compile is False
    assert p.parse_args([]).batched_cfg is False  # measured no faster: opt-in
    assert p.parse_args(['--use_batched_cfg']).batched_cfg is True
    assert p.parse_args(['--no-batched_cfg']).batched_cfg is False
    assert p.parse_args(['--no-use_batched_cfg']).batched_cfg is False
    assert p.parse_args([]).tf32 is False
    assert p.parse_args(['--tf32']).tf32 is True
    assert p.parse_args(['--attention', 'sdpa']).attention == 'sdpa'
    assert p.parse_args(['--compile_mode', 'max-autotune']).compile_mode == 'max-autotune'
    assert p.parse_args(['--seed', '5']).base_seed == 5
    assert p.parse_args(['--base_seed', '5']).base_seed == 5
    assert p.parse_args([]).base_seed == -1
    # the reference flags are all there
    ns = p.parse_args(['--task', 't2v-tiny', '--size', '128*64', '--ckpt_dir', 'x',
                       '--sample_solver', 'dpm++', '--sample_guide_scale', '4.5',
                       '--convert_model_dtype', '--t5_cpu', '--image', 'x.png'])
    assert ns.sample_guide_scale == 4.5 and ns.image == 'x.png'


def test_optimized_flags_run(tmp_path):
    save = tmp_path / 'x.mp4'
    rc, out, _ = run(TINY + ['--no-offload', '--no-compile', '--no-batched_cfg', '--tf32',
                             '--attention', 'sdpa', '--compile_mode', 'max-autotune',
                             '--sample_steps', '1', '--frame_num', '5', '--save_file',
                             str(save)], script=GENERATE_OPT)
    assert_ok(rc, out)
    assert "'batched_cfg': False" in out and "'compile': False" in out
    assert read_video(save)[0].shape == (5, 64, 128, 3)


@pytest.mark.parametrize('args,fragment', [
    (['--prompt_file', '{tmp}/nope.txt'], 'nope.txt'),
    (['--no-offload', '--offload_model', 'True'], 'contradicts'),
    (['--frame_num', '10'], '9 or 13'),
])
def test_optimized_bad_input(tmp_path, args, fragment):
    args = TINY + [a.replace('{tmp}', str(tmp_path)) for a in args] + \
        ['--save_file', str(tmp_path / 'x.mp4')]
    rc, out, _ = run(args, script=GENERATE_OPT, cwd=tmp_path)
    assert rc != 0 and fragment in out and 'Traceback' not in out
    assert 'Generating video' not in out
    assert os.listdir(tmp_path) == []


def test_import_alias_swap(tmp_path):
    """`wan.WanT2V = WanT2VOptimized` before running generate.main: the CLI picks it up."""
    save = tmp_path / 'alias.mp4'
    snippet = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {REPO_ROOT!r})
        import wan, wan.text2video_optimized as o
        wan.WanT2V = o.WanT2VOptimized
        import generate
        sys.exit(generate.main(['--task', 't2v-tiny', '--random_init', '--sample_steps', '2',
                                '--frame_num', '5', '--save_file', {str(save)!r}]))
    ''')
    start = time.monotonic()
    proc = subprocess.run([sys.executable, '-c', snippet], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert 'Creating WanT2VOptimized pipeline.' in out
    assert 'Creating WanT2V pipeline.' not in out
    assert read_video(save)[0].shape == (5, 64, 128, 3)
    assert time.monotonic() - start < 300
