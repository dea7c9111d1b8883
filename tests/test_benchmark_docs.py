"""The benchmark package on the CPU (schema, stage recorder, launchers, checks) and the
documents' tables vs bench/results."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cli, render  # noqa: E402
from bench.ablation import ablation_entry  # noqa: E402
from bench.children import EXIT_OUT_OF_MEMORY, failure_reason  # noqa: E402
from bench.instrument import StageRecorder  # noqa: E402
from bench.runs import RESULTS_DIR, toggle_names  # noqa: E402
from bench.scaling import child_argv  # noqa: E402
from bench.targets import Target, claim_verdict, verdict  # noqa: E402

TINY = ['--task', 't2v-tiny', '--sample_steps', '2']


# ----------------------------------------------------------------------------- one run
@pytest.mark.slow
def test_benchmark_smoke_schema(tmp_path):
    out = tmp_path / 'r.json'
    result = cli.main(TINY + ['--mode', 'both', '--same_kernel_baseline', '--output', str(out)])
    data = json.loads(out.read_text())
    assert data['schema'] == 'wan-fast-benchmark/1'
    for key in ('gpu', 'torch', 'cuda', 'attention_backends', 'git_commit', 'command'):
        assert key in data['env']
    assert data['task'] == 't2v-tiny' and data['size'] == '128*64' and data['frame_num'] == 9
    assert set(data['modes']) == {'baseline', 'baseline_same_kernel', 'optimized'}
    for mode in data['modes'].values():
        for expert in ('high', 'low'):  # the boundary split makes both experts run
            steps = mode['steps'][expert]
            assert len(steps['all_seconds']) == 1 and steps['median_seconds'] > 0
        assert len(mode['t5_seconds']) == 1 and len(mode['decode_seconds']) == 1
        assert len(mode['switch_seconds']) == 2
        # the VAE alone, inside the decode stage
        assert 0 < mode['vae_decode_seconds'][0] <= mode['decode_seconds'][0]
        assert mode['peak_gpu_gib_per_rank'] == [None]  # one CPU process
        assert mode['projected_40_step_seconds'] > 0
    assert data['parallel'] == {'world_size': 1, 'ulysses_size': 1, 'cfg_parallel': False,
                                'dit_fsdp': False, 't5_fsdp': False, 'backend': None}
    assert data['projection_split_40'] == {'high': 26, 'low': 14}
    assert data['speedup']['step_high'] > 0
    assert data['agreement']['psnr_db'] > 40  # same weights and seed, exact-math toggles
    assert data['modes']['optimized']['toggles']['per_sample_time'] is True
    assert result['output_path'] == str(out)
    assert not os.path.exists(str(out) + '.partial')  # only while running or after a failure


@pytest.mark.slow
def test_a_failed_run_keeps_its_measurements_in_the_partial_file(tmp_path, monkeypatch):
    import bench.runs

    def fail(*a, **k):
        raise RuntimeError('derivation failed')
    monkeypatch.setattr(bench.runs, 'derive', fail)  # after the mode has run
    out = tmp_path / 'r.json'
    with pytest.raises(RuntimeError, match='derivation failed'):
        cli.main(TINY + ['--mode', 'optimized', '--output', str(out)])
    assert not out.exists()
    partial = json.loads((tmp_path / 'r.json.partial').read_text())
    assert set(partial['modes']) == {'optimized'}
    assert partial['modes']['optimized']['steps']['high']['median_seconds'] > 0
    assert partial['error'] == 'RuntimeError: derivation failed'


def test_stage_recorder_follows_a_real_generate(tiny_pipe):
    rec = tiny_pipe.add_observer(StageRecorder(tiny_pipe.device))
    try:
        video = tiny_pipe.generate('a red fox in the snow', size=(128, 64), frame_num=9,
                                   shift=12.0, sampling_steps=4, guide_scale=(3.0, 4.0), seed=3)
    finally:
        tiny_pipe.remove_observer(rec)
    s = rec.seconds
    assert len(s['text_encode']) == 1 and len(s['decode']) == 1 and len(s['vae_decode']) == 1
    assert len(s['expert_switch']) == 4 and len(s['step']) == 4
    assert all(t > 0 for t in s['step'])
    assert rec.step_experts == ['high', 'high', 'high', 'low']  # boundary 0.875 at shift 12
    assert 0 < s['vae_decode'][0] <= s['decode'][0]
    # x0 is the latent that was decoded into this video
    assert rec.x0.dtype == torch.float32 and rec.x0.shape == (16, 3, 8, 16)
    torch.testing.assert_close(tiny_pipe.vae.decode([rec.x0])[0].float(), video.float(),
                               rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- checks
@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for CPU machines')
def test_a14b_on_the_cpu_is_refused_before_anything_is_built(monkeypatch):
    import bench.checks
    import wan.text2video
    from wan.modules.model import WanModel

    def must_not_build(*a, **k):
        raise AssertionError('a model was built')
    monkeypatch.setattr(wan.text2video.WanT2V, '__init__', must_not_build)
    monkeypatch.setattr(WanModel, 'from_random', must_not_build)
    monkeypatch.setattr(bench.checks, 'available_host_bytes', lambda: 16 * 2**30)
    with pytest.raises(SystemExit) as exc:
        cli.main([])  # the defaults: t2v-A14B, both modes
    msg = str(exc.value)
    assert msg.startswith('error: ') and '\n' not in msg
    assert '106 GiB' in msg and '16 GiB available' in msg and '--task t2v-tiny' in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for CPU machines')
def test_benchmark_cli_without_arguments_refuses_at_once_on_this_cpu():
    from bench.checks import available_host_bytes, expert_host_bytes
    from wan.configs import WAN_CONFIGS
    if (available_host_bytes() or 0) >= expert_host_bytes(WAN_CONFIGS['t2v-A14B']):
        pytest.skip('this machine could hold t2v-A14B on the CPU')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark_t2v.py')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --task t2v-A14B on the CPU needs')


@pytest.mark.parametrize('argv, message', [
    (['--task', 'i2v-A14B'], 'not supported by this project'),
    (['--task', 't2v-tiny', '--frame_num', '80'], 'nearest valid: 77 or 81'),
    (['--task', 't2v-tiny', '--frame_num', '-3'], 'positive 4n+1'),
    (['--task', 't2v-tiny', '--size', '1280*720'], 'valid: 128*64'),
    (['--task', 't2v-tiny', '--ablate', 'warp_drive'], 'not a toggle'),
    (['--task', 't2v-tiny', '--scaling', '2x'], 'GPU counts like 4 or 4c'),
])
def test_benchmark_refuses_bad_requests_in_one_line(argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert str(exc.value).startswith('error: ') and message in str(exc.value)


def test_optimize_t2v_validates_and_uses_the_task_defaults(capsys):
    import optimize_t2v
    for argv, message in ((['--task', 'i2v-A14B'], 'not supported by this project'),
                          (['--task', 't2v-tiny', '--frame_num', '80'], '4n+1'),
                          (['--task', 't2v-tiny', '--size', '1280*720'], 'not supported by')):
        with pytest.raises(SystemExit) as exc:
            optimize_t2v.main(argv + ['--no-time'])
        assert str(exc.value).startswith('error: ') and message in str(exc.value)
    assert optimize_t2v.main(['--task', 't2v-tiny', '--no-time', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out['size'], out['frame_num'], out['tokens']) == ('128*64', 9, 3 * 4 * 8)
    report = optimize_t2v.report('t2v-A14B', time_kernels=False)
    assert (report['size'], report['frame_num']) == ('1280*720', 81)


def test_optimize_t2v_reports_the_plan_for_a_given_gpu_size(capsys):
    """No GPU needed: the plan a 24 / 80 GiB GPU would get at 720p on a 128 GiB host, and a
    non-zero exit (with the shortfall) when nothing fits."""
    import optimize_t2v
    argv = ['--size', '1280*720', '--no-time', '--json', '--host_memory_gib', '128']
    assert optimize_t2v.main(argv + ['--gpu_memory_gib', '24']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['memory_plan'].startswith('high_noise streamed, low_noise streamed')
    assert optimize_t2v.main(argv + ['--gpu_memory_gib', '80']) == 0
    assert json.loads(capsys.readouterr().out)['memory_plan'].startswith(
        'high_noise resident, low_noise resident')
    assert optimize_t2v.main(argv + ['--gpu_memory_gib', '12']) == 1
    assert 'does not fit: the VAE decode' in json.loads(capsys.readouterr().out)['memory_plan']
    with pytest.raises(SystemExit, match='must be positive'):
        optimize_t2v.main(argv + ['--gpu_memory_gib', '0'])


def test_toggle_flags_come_from_the_optimization_config():
    from dataclasses import fields

    from wan.text2video_optimized import OptimizationConfig
    names = toggle_names()
    assert 'attention' not in names and 'compile_mode' not in names  # not on/off
    for f in fields(OptimizationConfig):
        if f.name in names:
            assert getattr(cli.parse_args([f'--no-{f.name}']), f.name) is False
            assert getattr(cli.parse_args([f'--{f.name}']), f.name) is True
            assert getattr(cli.parse_args([]), f.name) == getattr(OptimizationConfig(), f.name)


# ----------------------------------------------------------------------------- launchers
def test_launchers_rewrite_only_their_own_options():
    argv = ['--task', 't2v-tiny', '--scaling', '1', '2c', '--output=x.json', '--mode',
            'optimized', '--ulysses_size', '2', '--no-compile', '--save_results']
    assert child_argv(argv) == ['--task', 't2v-tiny', '--mode', 'optimized', '--no-compile']


def test_child_failures_are_named():
    assert failure_reason(0) is None
    assert failure_reason(EXIT_OUT_OF_MEMORY) == 'out of GPU memory'
    assert failure_reason(-9) == 'killed by SIGKILL (out of host memory?)'
    assert failure_reason(1) == 'exit 1'
    partial = {'error': 'OutOfMemoryError: CUDA out of memory', 'modes': {}}
    entry = ablation_entry('per_sample_time', False, EXIT_OUT_OF_MEMORY, partial, ['cmd'])
    assert entry['error'] == 'out of GPU memory' and 'steps' not in entry
    assert entry['error_detail'].startswith('OutOfMemoryError') and entry['flipped_to'] is False


@pytest.mark.slow
def test_ablation_runs_each_configuration_in_a_fresh_process(tmp_path):
    out = tmp_path / 'ablation.json'
    result = cli.main(TINY + ['--mode', 'optimized', '--ablate', 'fast_rope', '--output',
                              str(out)])
    data = json.loads(out.read_text())
    assert not os.path.exists(str(out) + '.partial')
    assert data['ablation_settings']['fresh_process'] is True
    assert set(data['ablation']) == {'none', 'fast_rope'}
    none, flipped = data['ablation']['none'], data['ablation']['fast_rope']
    for entry in (none, flipped):
        assert entry['returncode'] == 0 and 'error' not in entry
        assert entry['steps']['high']['median_seconds'] > 0
        assert '--no-convert_model_dtype' in entry['command']
    assert none['toggles']['fast_rope'] is True and flipped['toggles']['fast_rope'] is False
    assert flipped['flipped_to'] is False and '--no-fast_rope' in flipped['command']
    # the combined result is the 'none' run's own, so it renders like any other
    assert data['modes']['optimized']['toggles'] == none['toggles']
    assert result['output_path'] == str(out)


@pytest.mark.slow
def test_scaling_writes_under_bench_results_only_when_asked():
    before = set(os.listdir(RESULTS_DIR))
    result = cli.main(TINY + ['--mode', 'optimized', '--scaling', '1'])
    try:
        assert set(os.listdir(RESULTS_DIR)) == before
        path = result['output_path']
        assert not os.path.abspath(path).startswith(RESULTS_DIR)
        data = json.loads(open(path).read())
        assert data['schema'] == 'wan-fast-benchmark-scaling/1'
        assert data['runs'][0]['returncode'] == 0 and data['scaling'][0]['step_seconds'] > 0
        assert not os.path.exists(path + '.partial')
    finally:
        os.remove(result['output_path'])


def test_gpu_check_is_a_script_that_imports_on_the_cpu():
    from bench import gpu_check
    checks = gpu_check.Checks()
    ref = torch.ones(8)
    checks.add('same', ref.clone(), ref, gpu_check.TOL_FP32)
    checks.add('off by 10%', ref * 1.1, ref, gpu_check.TOL_BF16)
    assert checks.failed == ['off by 10%']
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2


# ----------------------------------------------------------------------------- documents
def test_documents_match_results():
    assert render.main(['--check']) == 0


def test_render_detects_a_stale_table():
    doc = '<!-- BEGIN claims -->\n| made up | 1 | 2 |\n<!-- END claims -->\n'
    rendered = render.render_text(doc)
    assert rendered != doc and 'made up' not in rendered
    assert render.render_text(rendered) == rendered  # stable
    with pytest.raises(KeyError):
        render.render_text('<!-- BEGIN nope -->\n<!-- END nope -->')


def test_verdicts_follow_the_numbers():
    at_most = Target(10.0, 'at most', 'step', ' s')
    assert verdict(at_most, 9.0) == 'met, 10.0% under'
    assert verdict(at_most, 11.5) == 'missed by 15.0%'
    assert verdict(Target(2.0, 'at least', 'speed-up', 'x'), 1.5) == 'missed by 25.0%'
    assert verdict(at_most, None) == 'n/m'
    claim = Target(300, 'claim', 'reference', ' s', tolerance=0.1)
    assert claim_verdict(claim, 310, 300, 200).startswith('reproduced')
    assert claim_verdict(claim, 1500, 300, 700) == \
        'not reproduced: measured 5.00x the claim; 300 s is below the floor of 700 s'
    assert 'floor' not in claim_verdict(claim, 1500, 300, 100)


def test_benchmark_lightning_preset_with_a_random_lora(tmp_path):
    """--preset lightning --lora_rank N on the tiny model: Euler, 4 steps (2 + 2 at boundary
    0.875), guidance 1.0 (one pass per step), the random LoRA merged into both experts."""
    from bench.cli import main
    out = tmp_path / 'l.json'
    main(['--task', 't2v-tiny', '--mode', 'optimized', '--preset', 'lightning',
          '--lora_rank', '4', '--output', str(out)])
    r = json.loads(out.read_text())
    s = r['settings']
    assert (s['sample_solver'], s['sample_steps'], s['sample_shift'], r['boundary_used']) == \
        ('euler', 4, 5.0, 0.875)
    steps = r['modes']['optimized']['steps']
    assert len(steps['high']['all_seconds']) == 2 and len(steps['low']['all_seconds']) == 2
    assert r['modes']['optimized']['toggles']['cfg_skip'] is True


@pytest.mark.skipif(importlib.util.find_spec('diffusers') is None,
                    reason='diffusers is optional (never a dependency); not installed here')
def test_peer_mode_smoke_on_cpu(tmp_path):
    """bench/peer.py --tiny: both transformers build at small widths and run a forward."""
    from bench.peer import main
    out = tmp_path / 'peer.json'
    assert main(['--tiny', '--sizes', '128*64', '--frames', '5', '--reps', '1',
                 '--output', str(out)]) == 0
    row = json.loads(out.read_text())['sizes']['128*64']
    assert row['ours']['seconds'] > 0 and row['diffusers_eager']['native']['seconds'] > 0


@pytest.mark.skipif(importlib.util.find_spec('diffusers') is None,
                    reason='diffusers is optional (never a dependency); not installed here')
def test_peer_pipeline_stage_smoke_on_cpu(tmp_path):
    """bench/peer.py --tiny --pipeline: WanT2VOptimized.generate and diffusers' WanPipeline
    (two experts, UniPC, a random VAE, prompt embeddings) each run a generation end to end,
    with per-step, decode and projected 40-step times."""
    from bench.peer import main
    out = tmp_path / 'peer.json'
    assert main(['--tiny', '--sizes', '128*64', '--frames', '5', '--pipeline', '--steps', '3',
                 '--no-forwards', '--output', str(out)]) == 0
    res = json.loads(out.read_text())['pipeline']
    assert res['steps'] == 3
    row = res['sizes']['128*64']
    for side in ('ours', 'diffusers'):
        assert 'error' not in row[side], row[side]
        r = row[side]
        assert 0 < r['step_seconds'] < r['total_seconds'] and r['decode_seconds'] > 0
        assert r['projected_40_step_seconds'] > 40 * r['step_seconds']
    assert row['ours']['t5_seconds'] > 0 and row['diffusers']['t5_seconds'] is None
    assert 0 < row['ours_projected_speedup'] < row['ours_projected_speedup_without_t5']
