"""benchmark_t2v.py on the CPU (schema, both modes) and the documents' tables vs bench/results."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import benchmark_t2v  # noqa: E402
import render  # noqa: E402


def test_benchmark_smoke_schema(tmp_path):
    out = tmp_path / 'r.json'
    result = benchmark_t2v.main(['--task', 't2v-tiny', '--mode', 'both', '--sample_steps', '2',
                                 '--same_kernel_baseline', '--output', str(out)])
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


def test_documents_match_results():
    assert render.main(['--check']) == 0


def test_render_detects_a_stale_table():
    doc = '<!-- BEGIN claims -->\n| made up | 1 | 2 |\n<!-- END claims -->\n'
    rendered = render.render_text(doc)
    assert rendered != doc and 'made up' not in rendered
    assert render.render_text(rendered) == rendered  # stable
    with pytest.raises(KeyError):
        render.render_text('<!-- BEGIN nope -->\n<!-- END nope -->')
