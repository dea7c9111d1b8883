"""Multi-process support on the CPU (gloo): Ulysses sequence parallelism, CFG parallelism, FSDP,
the distributed generate() and the CLI's layout checks (docs/PIPELINE.md#fsdp,
#ulysses-sequence-parallelism; docs/PITFALLS.md#sequence-parallel-padding).

Every multi-rank check runs in processes started with torch.multiprocessing (spawn), gloo,
MASTER_ADDR=127.0.0.1 and a free port. Workers return their results through files; the
single-process references are computed here, in the test process, from the same seeds. Work
is grouped into a few launches (module-scoped fixtures) to keep the file near a minute.
Everything runs in fp32 with no autocast (`ForwardOptions(attn_dtype=float32)`, a t2v-tiny
config copy with param_dtype float32), so agreement is checked to 1e-5 relative.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch

# every test here starts processes (gloo groups, torchrun)
pytestmark = pytest.mark.distributed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(REPO_ROOT, 'generate.py')
TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
RTOL = 1e-5
# fp8 linears output bf16, so a different GEMM split may round an output element differently
# (measured: 2e-7); fp8 itself moves the tiny model's output by ~7e-3
FP8_RTOL = 1e-4

TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
# latent shapes: 2*2*2 = 8 tokens (no padding on 2 ranks); 3*1*3 = 9 tokens (seq_len 10)
SHAPES = {'even': (16, 2, 4, 4), 'odd': (16, 3, 2, 6)}
MODES = [(fast_rope, per_sample) for fast_rope in (False, True) for per_sample in (False, True)]
# generate(): size (W, H) = (80, 48), 9 frames -> latent (16, 3, 6, 10) -> 3*3*5 = 45 tokens,
# padded to 46 on 2 Ulysses ranks
GEN_KW = dict(size=(80, 48), frame_num=9, shift=12.0, sample_solver='unipc', sampling_steps=4,
              guide_scale=(3.0, 4.0), seed=1234, offload_model=False)
PROMPT = 'a red fox runs through the snow'


# ------------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    try:
        result = fn(rank, world, *args)
    except Exception as exc:  # reported to the test, which decides
        result = {'error': f'{type(exc).__name__}: {exc}', 'traceback': traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    failed = isinstance(result, dict) and 'error' in result
    try:  # neither rank tears down while the other still talks to it
        if not failed:  # (a failed rank may have peers stuck in a collective: leave now)
            dist.barrier()
    except Exception:  # noqa: BLE001 - a peer that failed has left; its result file says why
        pass
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: once in CI, a rank that had finished aborted
    # there inside gloo/c10d ("terminate called without an active exception", SIGABRT), which
    # failed a test whose results were all written. The result file is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, tmp_dir, *args, world: int = 2, timeout: float = 150.0):
    """Run fn(rank, world, *args) on `world` gloo processes; list of per-rank results.

    A launch still running after `timeout` seconds (a hang) is killed and fails the test.
    """
    import torch.multiprocessing as mp
    os.makedirs(tmp_dir, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, _free_port(), str(tmp_dir), fn, args),
                             nprocs=world, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f'{fn.__name__}: the {world} ranks did not finish within {timeout} s '
                        '(hang)')
    return [torch.load(os.path.join(tmp_dir, f'rank{r}.pt'), weights_only=False)
            for r in range(world)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def no_error(results):
    for r, res in enumerate(results):
        assert not (isinstance(res, dict) and 'error' in res), \
            f'rank {r}: {res["error"]}\n{res.get("traceback", "")}'


# ------------------------------------------------------------------------------- inputs
def tiny_model(seed=0, **kw):
    from wan.modules.model import WanModel
    return WanModel.from_random(seed=seed, **{**TINY_DIT, **kw})


def fp8_tiny_model(seed=0, quantize=True):
    """The tiny DiT with bf16 matmul weights and attention, every block linear in fp8
    (--quantize all) unless quantize=False."""
    from wan.modules.fp8 import swap_linears_
    from wan.modules.model import ForwardOptions
    from wan.utils.dtype_policy import apply_dtype_policy_
    model = tiny_model(seed)
    if quantize:
        swap_linears_(model, 'all')
    apply_dtype_policy_(model, 'matmul', torch.bfloat16)
    model.set_options(ForwardOptions(attn_dtype=torch.bfloat16, fast_rope=True,
                                     per_sample_time=True))
    return model


def fp32_options(fast_rope=False, per_sample=False):
    from wan.modules.model import ForwardOptions
    return ForwardOptions(attn_dtype=torch.float32, fast_rope=fast_rope,
                          per_sample_time=per_sample)


def make_inputs(shape, batch=1, seed=1):
    """Latents, contexts (different text lengths) and timesteps, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*shape, generator=g) for _ in range(batch)]
    ctx = [torch.randn(7 + 3 * i, TINY_DIT['text_dim'], generator=g) for i in range(batch)]
    t = torch.tensor([700 + 150 * i for i in range(batch)])
    return xs, ctx, t


def tokens(shape):
    return shape[1] * (shape[2] // 2) * (shape[3] // 2)


def sp_seq_len(shape, world=2):
    n = tokens(shape)
    return -(-n // world) * world


def single_forward(shape, batch, fast_rope, per_sample, seq_len=None, seed=0):
    model = tiny_model(seed)
    model.set_options(fp32_options(fast_rope, per_sample))
    xs, ctx, t = make_inputs(shape, batch)
    with torch.no_grad():
        return model(xs, t, ctx, seq_len or tokens(shape))


def tiny_cfg_fp32(**overrides):
    from wan.configs import WAN_CONFIGS
    cfg = copy.deepcopy(WAN_CONFIGS['t2v-tiny'])
    cfg.param_dtype = torch.float32  # no bf16 autocast: tight comparisons
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------- workers
def _w_forward(rank, world):
    """Ulysses forwards in every mode, CFG-parallel predict, FSDP, and the heads check."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from wan.distributed.cfg_parallel import cfg_parallel_predict, make_groups
    from wan.distributed.fsdp import shard_model
    from wan.distributed.sequence_parallel import apply_sequence_parallel
    out = {'sp': {}}
    with torch.no_grad():
        # 1. Ulysses: both RoPE modes x both time modes x even/odd tokens x batch 1/2
        for fast_rope, per_sample in MODES:
            model = tiny_model()
            model.set_options(fp32_options(fast_rope, per_sample))
            apply_sequence_parallel(model)
            for name, shape in SHAPES.items():
                for batch in (1, 2):
                    xs, ctx, t = make_inputs(shape, batch)
                    out['sp'][(name, batch, fast_rope, per_sample)] = \
                        model(xs, t, ctx, sp_seq_len(shape, world))
        # a per-token time table given explicitly as (B, seq_len)
        xs, ctx, t = make_inputs(SHAPES['odd'])
        sl = sp_seq_len(SHAPES['odd'], world)
        out['sp_t2d'] = model(xs, t[:, None].expand(1, sl), ctx, sl)

        # 2. CFG parallel: rank 0 conditional, rank 1 unconditional, one all_gather
        _, cfg_group, info = make_groups(world, 1, True)
        out['cfg_info'] = info
        model = tiny_model()
        model.set_options(fp32_options())
        xs, ctx, t = make_inputs(SHAPES['odd'], batch=2)
        out['cfg'] = cfg_parallel_predict(model, xs[0], t[0], ctx[0], ctx[1],
                                          tokens(SHAPES['odd']), 3.5, cfg_group)

        # 3. FSDP: rank 1 starts from other weights; sync_module_states gives rank 0's
        model = tiny_model(seed=rank)
        model.set_options(fp32_options())
        n_full = sum(p.numel() for p in model.parameters())
        fsdp = shard_model(model, device_id=torch.device('cpu'), param_dtype=torch.float32)
        out['fsdp_units'] = sum(isinstance(m, FSDP) for m in fsdp.modules())
        out['fsdp_local_fraction'] = sum(p.numel() for p in fsdp.parameters()) / n_full
        xs, ctx, t = make_inputs(SHAPES['odd'])
        out['fsdp'] = fsdp(xs, t, ctx, tokens(SHAPES['odd']))
        # FSDP + Ulysses, as WanT2V builds it (patch first, then shard)
        model = tiny_model(seed=rank)
        model.set_options(fp32_options(fast_rope=True))
        apply_sequence_parallel(model)
        fsdp = shard_model(model, device_id=torch.device('cpu'), param_dtype=torch.float32)
        out['fsdp_sp'] = fsdp(xs, t, ctx, sp_seq_len(SHAPES['odd'], world))

        # 5. fp8 block linears (--quantize all) under Ulysses and under CFG parallelism,
        # under bf16 autocast as the pipeline runs them
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model = fp8_tiny_model()
            apply_sequence_parallel(model)
            xs, ctx, t = make_inputs(SHAPES['odd'])
            out['fp8_sp'] = model(xs, t, ctx, sp_seq_len(SHAPES['odd'], world))
            _, cfg_group, _ = make_groups(world, 1, True)
            model = fp8_tiny_model()
            xs, ctx, t = make_inputs(SHAPES['odd'], batch=2)
            out['fp8_cfg'] = cfg_parallel_predict(model, xs[0], t[0], ctx[0], ctx[1],
                                                  tokens(SHAPES['odd']), 3.5, cfg_group)

    # 4. heads not divisible by the SP size: a clear error on every rank
    try:
        apply_sequence_parallel(tiny_model(dim=48, num_heads=3))
        out['heads_error'] = None
    except ValueError as exc:
        out['heads_error'] = str(exc)
    dist.barrier()  # still in step: nothing hangs after the error
    return out


def _w_cfg_sp4(rank, world):
    """4 ranks: CFG parallel (2) x Ulysses (2) for one prediction."""
    from wan.distributed.cfg_parallel import cfg_parallel_predict, make_groups
    from wan.distributed.sequence_parallel import apply_sequence_parallel
    sp_group, cfg_group, info = make_groups(world, 2, True)
    model = tiny_model()
    model.set_options(fp32_options())
    apply_sequence_parallel(model, group=sp_group)
    xs, ctx, t = make_inputs(SHAPES['odd'], batch=2)
    with torch.no_grad():
        pred = cfg_parallel_predict(model, xs[0], t[0], ctx[0], ctx[1],
                                    sp_seq_len(SHAPES['odd'], 2), 3.5, cfg_group)
    return {'info': info, 'pred': pred}


def _record(pipe):
    """Record every CFG prediction, and the final latent on the rank that decodes."""
    rec = {'preds': [], 'x0': None}
    predict, decode = pipe._predict_noise, pipe.decode

    def _predict(*a, **k):
        v = predict(*a, **k)
        rec['preds'].append(v.clone())
        return v

    def _decode(x0):
        rec['x0'] = x0.clone()
        return decode(x0)
    pipe._predict_noise, pipe.decode = _predict, _decode
    return rec


def _w_generate(rank, world):
    """The tiny generate() with Ulysses 2, with CFG parallel, and with FSDP (T5 + DiT) + SP."""
    from wan.text2video import WanT2V
    out = {}
    for name, kw in [('sp', dict(use_sp=True)), ('cfg', dict(cfg_parallel=True)),
                     ('fsdp_sp', dict(use_sp=True, dit_fsdp=True, t5_fsdp=True))]:
        pipe = WanT2V(tiny_cfg_fp32(), None, rank=rank, random_init=True, device='cpu', **kw)
        rec = _record(pipe)
        video = pipe.generate(PROMPT, **GEN_KW)
        out[name] = {'video': video, 'sp_size': pipe.sp_size, **rec}
    return out


def _w_bad_input(rank, world):
    """Mismatched seeds and a heads/ulysses mismatch: ValueError on every rank, no hang."""
    from wan.distributed.util import agree_on_seed
    from wan.text2video import WanT2V
    out = {}
    pipe = WanT2V(tiny_cfg_fp32(), None, rank=rank, random_init=True, device='cpu',
                  use_sp=True)
    try:
        pipe.generate(PROMPT, **{**GEN_KW, 'seed': 100 + rank})
        out['seed_error'] = None
    except ValueError as exc:
        out['seed_error'] = str(exc)
    out['random_seed'] = agree_on_seed(-1)  # -1 everywhere: rank 0's draw on every rank
    try:
        WanT2V(tiny_cfg_fp32(dim=48, num_heads=3), None, rank=rank, random_init=True,
               device='cpu', use_sp=True)
        out['heads_error'] = None
    except ValueError as exc:
        out['heads_error'] = str(exc)
    try:
        WanT2V(tiny_cfg_fp32(), None, rank=rank, random_init=True, device='cpu',
               use_sp=True, cfg_parallel=True, ulysses_size=2)
        out['layout_error'] = None
    except ValueError as exc:
        out['layout_error'] = str(exc)
    return out


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def forward_results(tmp_path_factory):
    res = launch(_w_forward, tmp_path_factory.mktemp('fwd'))
    no_error(res)
    return res


@pytest.fixture(scope='module')
def generate_results(tmp_path_factory):
    res = launch(_w_generate, tmp_path_factory.mktemp('gen'), timeout=240)
    no_error(res)
    return res


@pytest.fixture(scope='module')
def single_generate():
    from wan.text2video import WanT2V
    pipe = WanT2V(tiny_cfg_fp32(), None, random_init=True, device='cpu')
    rec = _record(pipe)
    video = pipe.generate(PROMPT, **GEN_KW)
    return {'video': video, **rec}


# ------------------------------------------------------------------------------- 1. Ulysses
@pytest.mark.parametrize('fast_rope,per_sample', MODES)
@pytest.mark.parametrize('name', list(SHAPES))
@pytest.mark.parametrize('batch', [1, 2])
def test_ulysses_matches_single_process(forward_results, name, batch, fast_rope, per_sample):
    shape = SHAPES[name]
    ref = single_forward(shape, batch, fast_rope, per_sample)
    assert (sp_seq_len(shape) > tokens(shape)) == (name == 'odd')  # padding exercised
    for r, res in enumerate(forward_results):
        got = res['sp'][(name, batch, fast_rope, per_sample)]
        assert len(got) == batch
        for g, e in zip(got, ref):
            assert g.shape == e.shape and g.dtype == torch.float32
            assert rel(g, e) <= RTOL, (r, rel(g, e))


def test_ulysses_ranks_identical_and_2d_timesteps(forward_results):
    a, b = forward_results
    for key in a['sp']:
        assert all(torch.equal(x, y) for x, y in zip(a['sp'][key], b['sp'][key])), key
    # explicit (B, seq_len) timesteps in the last mode built (fast_rope, per_sample_time)
    ref = single_forward(SHAPES['odd'], 1, True, True)
    for res in forward_results:
        assert rel(res['sp_t2d'][0], ref[0]) <= RTOL


def test_sp_padding_is_invisible():
    """The single-process forward at the padded seq_len equals the unpadded one (the property
    the SP path relies on: padded keys excluded, identity RoPE past the true length)."""
    for fast_rope, per_sample in MODES:
        a = single_forward(SHAPES['odd'], 1, fast_rope, per_sample)[0]
        b = single_forward(SHAPES['odd'], 1, fast_rope, per_sample, seq_len=12)[0]
        assert rel(b, a) <= RTOL


def test_sp_rope_slices_match_rope_apply():
    from wan.modules.model import apply_rope, rope_apply
    # the rank slices of the padded per-token table, concatenated, rotate like rope_apply
    model = tiny_model()
    grid = torch.tensor([[3, 1, 3]])
    x = torch.randn(1, 10, 2, 32)
    full = rope_apply(x, grid, model.freqs)
    table = model.rope_table(grid, 10, x.device)
    parts = [apply_rope(x[:, r * 5:(r + 1) * 5], table[:, r * 5:(r + 1) * 5], torch.float32)
             for r in range(2)]
    assert torch.equal(torch.cat(parts, 1), full)


# ------------------------------------------------------------------------------- 2. CFG
def sequential_cfg_reference():
    """The single-process CFG prediction the CFG-parallel workers compute (scale 3.5), and
    the model and inputs it came from."""
    model = tiny_model()
    model.set_options(fp32_options())
    xs, ctx, t = make_inputs(SHAPES['odd'], batch=2)
    n = tokens(SHAPES['odd'])
    with torch.no_grad():
        cond = model([xs[0]], t[:1], [ctx[0]], n)[0]
        uncond = model([xs[0]], t[:1], [ctx[1]], n)[0]
    return uncond + 3.5 * (cond - uncond), model, (xs, ctx, t, n)


def test_cfg_parallel_matches_sequential(forward_results):
    ref, model, (xs, ctx, t, n) = sequential_cfg_reference()
    with torch.no_grad():
        batched = model([xs[0], xs[0]], torch.stack([t[0], t[0]]), [ctx[0], ctx[1]], n)
    ref_batched = batched[1] + 3.5 * (batched[0] - batched[1])
    a, b = forward_results
    assert a['cfg_info'].cfg_rank == 0 and b['cfg_info'].cfg_rank == 1
    assert torch.equal(a['cfg'], b['cfg'])  # every rank gets the same prediction
    assert rel(a['cfg'], ref) <= RTOL
    assert rel(a['cfg'], ref_batched) <= RTOL


def test_fp8_linears_compose_with_ulysses_and_cfg_parallel(forward_results):
    """fp8 linears quantize per token, so a sequence shard or a CFG half quantizes each
    token as the full single-process pass does: Ulysses and CFG parallelism give the
    single-process fp8 result (up to the bf16 rounding of the fp8 GEMM outputs), which is
    itself measurably away from the unquantized model's."""
    shape = SHAPES['odd']
    n = tokens(shape)
    xs, ctx, t = make_inputs(shape)
    xs2, ctx2, t2 = make_inputs(shape, batch=2)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ref = fp8_tiny_model()(xs, t, ctx, n)[0]
        exact = fp8_tiny_model(quantize=False)(xs, t, ctx, n)[0]
        model = fp8_tiny_model()
        cond = model([xs2[0]], t2[:1], [ctx2[0]], n)[0]
        uncond = model([xs2[0]], t2[:1], [ctx2[1]], n)[0]
    ref_cfg = uncond + 3.5 * (cond - uncond)
    assert rel(ref, exact) > 1e-3  # fp8 is in effect
    for res in forward_results:
        assert rel(res['fp8_sp'][0], ref) <= FP8_RTOL, rel(res['fp8_sp'][0], ref)
        assert rel(res['fp8_cfg'], ref_cfg) <= FP8_RTOL, rel(res['fp8_cfg'], ref_cfg)


def test_cfg_parallel_with_ulysses_on_4_ranks(tmp_path):
    res = launch(_w_cfg_sp4, tmp_path, world=4)
    no_error(res)
    assert [r['info'].cfg_rank for r in res] == [0, 0, 1, 1]
    assert [r['info'].sp_ranks for r in res] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [r['info'].cfg_ranks for r in res] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    ref, _, _ = sequential_cfg_reference()
    for r in res:
        assert torch.equal(r['pred'], res[0]['pred'])
        assert rel(r['pred'], ref) <= RTOL


def test_make_groups_layout_errors():
    from wan.distributed.cfg_parallel import parallel_layout
    assert parallel_layout(4, None, True) == (2, 2)
    assert parallel_layout(2, 1, True) == (2, 1)
    assert parallel_layout(8, None, False) == (1, 8)
    for args in [(3, None, True), (4, 1, True), (4, 2, False), (1, None, True)]:
        with pytest.raises(ValueError):
            parallel_layout(*args)


# ------------------------------------------------------------------------------- 3. FSDP
def test_fsdp_matches_unwrapped(forward_results):
    ref = single_forward(SHAPES['odd'], 1, False, False)[0]
    for res in forward_results:
        # one unit per block plus the root
        assert res['fsdp_units'] == TINY_DIT['num_layers'] + 1
        assert 0.45 < res['fsdp_local_fraction'] <= 0.55  # FULL_SHARD: half per rank
        # rank 1 started from seed-1 weights: sync_module_states gave it rank 0's
        assert rel(res['fsdp'][0], ref) <= RTOL


def test_fsdp_with_ulysses_matches_unwrapped(forward_results):
    ref = single_forward(SHAPES['odd'], 1, True, False)[0]
    for res in forward_results:
        assert rel(res['fsdp_sp'][0], ref) <= RTOL


def test_fsdp_device_resolution():
    from wan.distributed.fsdp import resolve_fsdp_device
    assert resolve_fsdp_device(torch.device('cpu')) == torch.device('cpu')
    if not torch.cuda.is_available():
        assert resolve_fsdp_device(0) == torch.device('cpu')
        assert resolve_fsdp_device(None) == torch.device('cpu')


# ------------------------------------------------------------------------------- 4. generate
@pytest.mark.parametrize('mode', ['sp', 'cfg', 'fsdp_sp'])
def test_generate_matches_single_process(generate_results, single_generate, mode):
    r0, r1 = (res[mode] for res in generate_results)
    assert r0['sp_size'] == (1 if mode == 'cfg' else 2)
    assert r1['video'] is None and r1['x0'] is None  # only rank 0 decodes and returns
    assert r0['video'].shape == single_generate['video'].shape == (3, 9, 48, 80)
    assert rel(r0['x0'], single_generate['x0']) <= RTOL
    assert rel(r0['video'], single_generate['video']) <= RTOL
    assert len(r0['preds']) == len(r1['preds']) == GEN_KW['sampling_steps']
    for p0, p1, e in zip(r0['preds'], r1['preds'], single_generate['preds']):
        assert torch.equal(p0, p1)  # both ranks run identical solver steps
        assert rel(p0, e) <= RTOL


# ------------------------------------------------------------------------------- 5. bad input
def test_bad_heads_raise_on_every_rank(forward_results):
    for res in forward_results:
        assert res['heads_error'] and '3 attention heads' in res['heads_error'] \
            and 'sequence-parallel size 2' in res['heads_error']


def test_bad_input_in_pipeline_raises_on_every_rank(tmp_path):
    res = launch(_w_bad_input, tmp_path, timeout=90)
    no_error(res)
    for r in res:
        assert r['seed_error'] and 'different seeds [100, 101]' in r['seed_error']
        assert r['heads_error'] and 'divisible' in r['heads_error']
        assert r['layout_error'] and 'needs world size 4, got 2' in r['layout_error']
    assert res[0]['random_seed'] == res[1]['random_seed'] >= 0


def _run_cli(cmd, timeout=120):
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_cfg_parallel_without_torchrun(tmp_path):
    rc, out = _run_cli([sys.executable, GENERATE, '--task', 't2v-tiny', '--random_init',
                        '--cfg_parallel', '--save_file', str(tmp_path / 'x.mp4')])
    assert rc == 1, out
    assert '--cfg_parallel on 1 process(es): CFG parallelism needs a distributed launch' in out
    assert not (tmp_path / 'x.mp4').exists()


@pytest.mark.parametrize('world,flags,message', [
    (2, ['--ulysses_size', '3'], 'ulysses_size 3 must equal the world size 2'),
    (2, ['--ulysses_size', '2', '--cfg_parallel'], 'needs world size 4, got 2'),
    (4, ['--ulysses_size', '4'], 'the 2 attention heads to be divisible by the '
                                 'sequence-parallel size 4'),
    (1, ['--ulysses_size', '0'], 'ulysses_size must be >= 1'),
    (1, ['--cfg_parallel'], 'CFG parallelism needs a distributed launch'),
])
def test_validate_args_layout(world, flags, message, tmp_path):
    import generate
    args = generate._parser().parse_args(['--task', 't2v-tiny', '--random_init', '--save_file',
                                          str(tmp_path / 'x.mp4')] + flags)
    with pytest.raises(generate.UserError, match=message.replace('(', r'\(')):
        generate.validate_args(args, world)


def test_validate_args_accepts_cfg_parallel_layouts(tmp_path):
    import generate
    for world, flags in [(2, ['--cfg_parallel']), (4, ['--cfg_parallel', '--ulysses_size', '2']),
                         (2, ['--ulysses_size', '2']), (2, ['--dit_fsdp'])]:
        args = generate._parser().parse_args(['--task', 't2v-tiny', '--random_init',
                                              '--save_file', str(tmp_path / 'x.mp4')] + flags)
        generate.validate_args(args, world)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason='torchrun not installed')
def test_cli_wrong_ulysses_size_fails_on_every_rank(tmp_path):
    """torchrun with 2 processes and --ulysses_size 3: both ranks exit with the message, no
    hang (validation comes before any collective)."""
    rc, out = _run_cli([TORCHRUN, '--standalone', '--nproc_per_node', '2', GENERATE,
                        '--task', 't2v-tiny', '--random_init', '--ulysses_size', '3',
                        '--save_file', str(tmp_path / 'x.mp4')], timeout=90)
    assert rc != 0
    assert out.count('ulysses_size 3 must equal the world size 2') >= 2, out[-3000:]


def test_optimized_pipeline_cfg_parallel_wins_over_batched_cfg(monkeypatch):
    """WanT2VOptimized: with cfg_parallel the memory plan never batches CFG, and even a
    batched plan goes through cfg_parallel_predict (not the batch-2 forward)."""
    import dataclasses
    import wan.distributed.cfg_parallel as cfgp
    from wan.text2video_optimized import OptimizationConfig, WanT2VOptimized
    pipe = WanT2VOptimized(tiny_cfg_fp32(), None, random_init=True, device='cpu',
                           optimizations=OptimizationConfig(compile=False, batched_cfg=True))
    assert pipe.plan_for((80, 48), 9).batched_cfg
    pipe.cfg_parallel = True  # as set by the constructor under torchrun
    plan = pipe.plan_for((80, 48), 9)
    assert not plan.batched_cfg
    calls = []
    monkeypatch.setattr(cfgp, 'cfg_parallel_predict',
                        lambda *a, **k: calls.append(a) or torch.zeros(1))
    # even a plan that says batched for every expert
    pipe._plan = dataclasses.replace(plan, experts=tuple(
        dataclasses.replace(e, cfg='batched') for e in plan.experts))
    lat = torch.zeros(16, 3, 6, 10)
    ctx = torch.zeros(5, TINY_DIT['text_dim'])
    out = pipe._predict_noise(pipe.low_noise_model, lat, torch.tensor(10), ctx, ctx, 45, 3.0)
    assert len(calls) == 1 and torch.equal(out, torch.zeros(1))


def _read_frames(path):
    import imageio
    import numpy as np
    reader = imageio.get_reader(str(path), 'ffmpeg')
    try:
        return np.stack([frame for frame in reader]).astype(int)
    finally:
        reader.close()


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason='torchrun not installed')
def test_cli_torchrun_sp_fsdp_matches_single_process(tmp_path):
    """The README's multi-GPU command shape (--dit_fsdp --t5_fsdp --ulysses_size N) under
    torchrun on 2 CPU processes writes the same video as the single-process run."""
    common = ['--task', 't2v-tiny', '--random_init', '--sample_steps', '3', '--prompt', PROMPT,
              '--base_seed', '7']
    rc, out = _run_cli([sys.executable, GENERATE] + common +
                       ['--save_file', str(tmp_path / 'single.mp4')])
    assert rc == 0, out[-3000:]
    rc, out = _run_cli([TORCHRUN, '--standalone', '--nproc_per_node', '2', GENERATE] + common +
                       ['--ulysses_size', '2', '--dit_fsdp', '--t5_fsdp',
                        '--save_file', str(tmp_path / 'sp.mp4')])
    assert rc == 0, out[-3000:]
    assert 'Finished.' in out
    single, sp = _read_frames(tmp_path / 'single.mp4'), _read_frames(tmp_path / 'sp.mp4')
    assert single.shape == sp.shape
    assert abs(single - sp).max() <= 1  # identical up to one uint8 level


# ------------------------------------------------------------------------------- compile
def _w_sp_compiled(rank, world):
    """Ulysses forward with the transformer blocks compiled as WanT2VOptimized compiles them
    (on the GPU; here the CPU inductor backend): the all_to_all inside the block must trace
    (dynamo turns it into a functional collective) and give the eager result. Without padding
    (the real sizes: 75600 tokens split evenly over 2, 4 or 8 ranks) the block is one graph;
    padded keys take the varlen attention path, which may break the graph but stays exact."""
    import torch._dynamo
    from wan.distributed.sequence_parallel import apply_sequence_parallel
    from wan.optimizations import compile_blocks
    model = tiny_model()
    model.set_options(fp32_options(fast_rope=True, per_sample=True))
    apply_sequence_parallel(model)
    out = {}

    def run(shape):
        xs, ctx, t = make_inputs(shape)
        return model(xs, t, ctx, sp_seq_len(shape, world))[0]

    torch._dynamo.reset()
    with torch.no_grad():
        eager = {name: run(shape) for name, shape in SHAPES.items()}
        compile_blocks(model, 'default')
        for name, shape in SHAPES.items():  # 'even' first: no padding
            torch._dynamo.utils.counters.clear()
            out[name] = {'eager': eager[name],
                         'compiled': run(shape),
                         'graph_breaks': sum(torch._dynamo.utils.counters['graph_break']
                                             .values())}
    return out


def test_ulysses_with_compiled_blocks(tmp_path):
    res = launch(_w_sp_compiled, tmp_path, timeout=240)
    no_error(res)
    for r in res:
        assert r['even']['graph_breaks'] == 0
        for name in SHAPES:
            assert rel(r[name]['compiled'], r[name]['eager']) <= RTOL
    for name, shape in SHAPES.items():
        single = single_forward(shape, 1, True, True, seq_len=sp_seq_len(shape))[0]
        assert rel(res[0][name]['compiled'][:, :, :single.shape[2]], single) <= RTOL


# ------------------------------------------------------------------------------- benchmark
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason='torchrun not installed')
def test_benchmark_scaling_launcher(tmp_path):
    """benchmark_t2v.py --scaling 1 2 2c: one torchrun per entry (1 process, Ulysses over 2,
    CFG parallel over 2), rank 0's JSON from each, per-step scaling against the 1-process run."""
    import json
    out = tmp_path / 'scaling.json'
    rc, log = _run_cli([sys.executable, os.path.join(REPO_ROOT, 'benchmark_t2v.py'),
                        '--task', 't2v-tiny', '--mode', 'optimized', '--sample_steps', '2',
                        '--scaling', '1', '2', '2c', '--output', str(out)], timeout=240)
    assert rc == 0, log[-3000:]
    data = json.loads(out.read_text())
    assert data['schema'] == 'wan-fast-benchmark-scaling/1'
    runs = {(r['nproc'], r['cfg_parallel']): r for r in data['runs']}
    assert set(runs) == {(1, False), (2, False), (2, True)}
    for (n, cfg), run in runs.items():
        assert run['returncode'] == 0 and not run['partial']
        par = run['result']['parallel']
        assert (par['world_size'], par['cfg_parallel']) == (n, cfg)
        assert par['ulysses_size'] == (1 if cfg or n == 1 else 2)
        assert len(run['result']['modes']['optimized']['peak_gpu_gib_per_rank']) == n
    rows = {(r['nproc'], r['cfg_parallel']): r for r in data['scaling']}
    assert rows[(1, False)]['speedup_vs_1'] == 1.0
    for row in rows.values():
        assert row['step_seconds'] > 0 and row['scaling_efficiency'] > 0
        assert row['projected_40_step_seconds'] > 0


def test_benchmark_refuses_a_layout_that_does_not_fill_the_world():
    from bench.cli import main
    with pytest.raises(SystemExit, match='^error: 1 process.*cannot run ulysses_size 2'):
        main(['--task', 't2v-tiny', '--ulysses_size', '2'])


OPTIMIZED = os.path.join(REPO_ROOT, 'generate_optimized.py')


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason='torchrun not installed')
def test_prompt_file_on_two_processes_is_two_pipeline_replicas(tmp_path):
    """torchrun with 2 processes, --prompt_file of 3 prompts, --ulysses_size 1: two replicas
    of one process each share the prompts (0 and 2 on the first, 1 on the second) and write
    the same files, with the same frames, as one process does; a summary line counts them."""
    prompts = tmp_path / 'p.txt'
    prompts.write_text('a red fox\na blue boat\na green tree\n')
    common = ['--task', 't2v-tiny', '--random_init', '--prompt_file', str(prompts),
              '--sample_steps', '3', '--frame_num', '5', '--base_seed', '11']
    (tmp_path / 'one').mkdir()
    (tmp_path / 'two').mkdir()
    rc, out = _run_cli([sys.executable, OPTIMIZED, *common, '--save_file',
                        str(tmp_path / 'one' / 'v.mp4')], timeout=240)
    assert rc == 0, out[-3000:]
    rc, out = _run_cli([TORCHRUN, '--standalone', '--nproc_per_node', '2', OPTIMIZED, *common,
                        '--ulysses_size', '1', '--save_file', str(tmp_path / 'two' / 'v.mp4')],
                       timeout=240)
    assert rc == 0, out[-3000:]
    assert '3 videos in' in out and '(2 pipeline replica(s))' in out
    names = sorted(os.listdir(tmp_path / 'one'))
    assert names == ['v_000.mp4', 'v_001.mp4', 'v_002.mp4'] == sorted(os.listdir(tmp_path / 'two'))
    for name in names:
        a, b = _read_frames(tmp_path / 'one' / name), _read_frames(tmp_path / 'two' / name)
        assert a.shape == b.shape and (a == b).all(), name
    # the prompts differ, so the videos do
    assert not (_read_frames(tmp_path / 'one' / names[0]) ==
                _read_frames(tmp_path / 'one' / names[1])).all()


def _w_replica_groups(rank, world):
    """4 ranks as 2 replicas of CFG-2 x Ulysses-1: each replica's groups and seed."""
    import torch.distributed as dist
    from wan.distributed.cfg_parallel import make_groups, replica_group
    from wan.distributed.util import agree_on_seed
    sp, cfg, info = make_groups(world, 1, True, data_parallel=2)
    group = replica_group(info)
    # each replica agrees on its own seed (here: its own random draw, different per replica)
    seed = agree_on_seed(-1 if info.replica == 0 else 1000 + info.replica, group)
    return {'replica': info.replica, 'replica_ranks': info.replica_ranks,
            'replica_rank': info.replica_rank, 'cfg_ranks': info.cfg_ranks,
            'cfg_rank': info.cfg_rank, 'cfg_group_size': dist.get_world_size(cfg),
            'seed': seed}


def test_replica_groups_layout(tmp_path):
    from wan.distributed.cfg_parallel import data_parallel_layout
    assert data_parallel_layout(8, 2, True) == 2 and data_parallel_layout(8, 1, False) == 8
    with pytest.raises(ValueError, match='not a multiple'):
        data_parallel_layout(6, 4, False)
    res = launch(_w_replica_groups, tmp_path, world=4)
    no_error(res)
    assert [r['replica'] for r in res] == [0, 0, 1, 1]
    assert [r['replica_ranks'] for r in res] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [r['replica_rank'] for r in res] == [0, 1, 0, 1]
    assert [r['cfg_ranks'] for r in res] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [r['cfg_rank'] for r in res] == [0, 1, 0, 1]
    assert all(r['cfg_group_size'] == 2 for r in res)
    # seeds agree inside a replica, not across replicas
    assert res[0]['seed'] == res[1]['seed'] and res[2]['seed'] == res[3]['seed'] == 1001


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason='torchrun not installed')
def test_benchmark_throughput_mode(tmp_path):
    """--throughput 3 --nproc 2 --layouts 1 2: two replicas of one process vs one 2-way
    Ulysses pipeline, every prompt generated once per layout, videos per hour per layout."""
    out = tmp_path / 'tp.json'
    rc, log = _run_cli([sys.executable, os.path.join(REPO_ROOT, 'benchmark_t2v.py'), '--task',
                        't2v-tiny', '--throughput', '3', '--nproc', '2', '--layouts', '1', '2',
                        '--sample_steps', '2', '--output', str(out)], timeout=240)
    assert rc == 0, log[-3000:]
    data = json.loads(out.read_text())
    assert [r['layout'] for r in data['runs']] == ['1', '2']
    assert [r['replicas'] for r in data['runs']] == [2, 1]
    for r in data['runs']:
        assert r['result']['videos'] == 3 and r['result']['videos_per_hour'] > 0
    assert max(r['relative_to_best'] for r in data['runs']) == 1.0
    assert not os.path.exists(str(out) + '.partial')
