"""fp8 GEMMs and fp8 attention at the DiT block's shapes: speed and error vs bf16 (a diagnostic).

    python bench/fp8_check.py --output fp8_check.json [--tokens 32760 75600]

Random data (not the trained model's activations). Tokens 32760 and 75600 are the A14B
experts' sequence lengths at 832x480 and 1280x720, 81 frames; dim 5120, FFN 13824, 40 heads of
128. Three parts:

1. linear: bf16 F.linear vs Fp8Linear at 5120->5120, 5120->13824, 13824->5120, eager: the
   bare fp8 GEMM (input quantized beforehand), and Fp8Linear with its own input quantization
   as separate kernels.
2. mlp: LayerNorm -> modulation -> Linear -> GELU -> Linear, as in a block's FFN branch, bf16
   vs fp8, each inside torch.compile, where the input quantization can fuse into the
   norm/modulation and GELU kernels.
3. attention (needs FA3: flash_attn_interface or the fa3-fwd wheel): FA3 bf16 vs
   fp8_attention eager and compiled, the bare fp8 kernel, and the kernel against its CPU-side
   emulation (fp8_attention_reference) on a small shape.

Errors are relative Frobenius errors against fp32 references computed on a subset of rows
(the ops are row-independent, except attention, whose reference uses all keys).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan.modules.attention import _fa3_module  # noqa: E402
from wan.modules.fp8 import (Fp8Linear, fp8_attention, fp8_attention_available,  # noqa: E402
                             fp8_attention_reference, quantize_attention_inputs,
                             quantize_rowwise)

DIM, FFN, HEADS, HEAD_DIM = 5120, 13824, 40, 128
REF_ROWS = 2048  # rows (or queries) of the fp32 references


def timed(fn, reps: int) -> float:
    """Median milliseconds of `reps` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e9


# ----------------------------------------------------------------------------- 1. linear
def check_linear(tokens: int, k: int, n: int, reps: int) -> dict:
    gen = torch.Generator('cuda').manual_seed(0)
    x = torch.randn(tokens, k, device='cuda', generator=gen).bfloat16()
    lin = nn.Linear(k, n, device='cuda')
    w, b = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    fp8 = Fp8Linear.from_linear(lin)
    xq, xs = quantize_rowwise(x)
    wt, ws = fp8.weight.t(), fp8.weight_scale.t()
    flop = 2 * tokens * k * n
    row = {'tokens': tokens, 'k': k, 'n': n}
    row['bf16_ms'] = timed(lambda: F.linear(x, w, b), reps)
    row['fp8_gemm_ms'] = timed(lambda: torch._scaled_mm(
        xq, wt, scale_a=xs, scale_b=ws, bias=b, out_dtype=torch.bfloat16), reps)
    row['fp8_gemm_fast_accum_ms'] = timed(lambda: torch._scaled_mm(
        xq, wt, scale_a=xs, scale_b=ws, bias=b, out_dtype=torch.bfloat16,
        use_fast_accum=True), reps)
    row['fp8_linear_eager_ms'] = timed(lambda: fp8(x), reps)
    for key in ('bf16', 'fp8_gemm', 'fp8_gemm_fast_accum', 'fp8_linear_eager'):
        row[f'{key}_tflops'] = tflops(flop, row[f'{key}_ms'])
    with torch.no_grad():
        ref = F.linear(x[:REF_ROWS].float(), lin.weight.float(), lin.bias.float())
        row['err_bf16'] = rel(F.linear(x[:REF_ROWS], w, b), ref)
        row['err_fp8'] = rel(fp8(x[:REF_ROWS]), ref)
        row['err_fp8_fast_accum'] = rel(torch._scaled_mm(
            xq[:REF_ROWS], wt, scale_a=xs[:REF_ROWS], scale_b=ws, bias=b,
            out_dtype=torch.bfloat16, use_fast_accum=True), ref)
    return row


# ----------------------------------------------------------------------------- 2. mlp
class BlockMlp(nn.Module):
    """A block's FFN branch: fp32 LayerNorm, fp32 modulation, then Linear-GELU-Linear under
    the caller's bf16 autocast (the same precision map as WanAttentionBlock)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(approximate='tanh'),
                                 nn.Linear(FFN, DIM))

    def forward(self, x, shift, scale):
        return self.ffn(self.norm(x.float()) * (1 + scale) + shift)


def check_mlp(tokens: int, reps: int) -> dict:
    gen = torch.Generator('cuda').manual_seed(1)
    x = torch.randn(1, tokens, DIM, device='cuda', generator=gen)
    shift, scale = (0.1 * torch.randn(1, 1, DIM, device='cuda', generator=gen)
                    for _ in range(2))
    ref_mod = BlockMlp().cuda().eval().requires_grad_(False)
    bf16 = BlockMlp().cuda().eval().requires_grad_(False)
    bf16.load_state_dict(ref_mod.state_dict())
    bf16.ffn.to(torch.bfloat16)
    fp8 = BlockMlp().cuda().eval().requires_grad_(False)
    fp8.load_state_dict(ref_mod.state_dict())
    fp8.ffn[0] = Fp8Linear.from_linear(fp8.ffn[0])
    fp8.ffn[2] = Fp8Linear.from_linear(fp8.ffn[2])
    flop = 2 * 2 * tokens * DIM * FFN
    row = {'tokens': tokens}

    def run(mod):
        with torch.autocast('cuda', dtype=torch.bfloat16), torch.no_grad():
            return mod(x, shift, scale)

    row['fp8_eager_ms'] = timed(lambda: run(fp8), reps)
    with torch.no_grad():
        ref = ref_mod(x[:, :REF_ROWS], shift, scale)
    for name, mod in (('bf16', bf16), ('fp8', fp8)):
        compiled = torch.compile(mod, dynamic=False)
        t0 = time.perf_counter()
        out = run(compiled)
        torch.cuda.synchronize()
        row[f'{name}_compile_s'] = time.perf_counter() - t0
        row[f'err_{name}'] = rel(out[:, :REF_ROWS], ref)
        del out
        row[f'{name}_compiled_ms'] = timed(lambda: run(compiled), reps)  # noqa: B023
        row[f'{name}_compiled_tflops'] = tflops(flop, row[f'{name}_compiled_ms'])
    row['fp8_eager_tflops'] = tflops(flop, row['fp8_eager_ms'])
    row['speedup_compiled'] = row['bf16_compiled_ms'] / row['fp8_compiled_ms']
    return row


# ----------------------------------------------------------------------------- 3. attention
def _qkv(b, length, h, d, key_offset, seed):
    gen = torch.Generator('cuda').manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, device='cuda', generator=gen) for _ in range(3))
    k = k + key_offset * torch.randn(1, 1, h, d, device='cuda', generator=gen)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def _ref_attention(q, k, v, rows):
    """fp32 attention of the first `rows` queries over all keys."""
    qs, ks, vs = (t.float().transpose(1, 2) for t in (q[:, :rows], k, v))
    return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)


def check_attention(tokens: int, reps: int, key_offset: float) -> dict:
    mod = _fa3_module()
    q, k, v = _qkv(1, tokens, HEADS, HEAD_DIM, key_offset, seed=2)
    flop = 4 * tokens * tokens * HEADS * HEAD_DIM
    row = {'tokens': tokens, 'heads': HEADS, 'head_dim': HEAD_DIM, 'key_offset': key_offset}

    def first(o):
        return o[0] if isinstance(o, (tuple, list)) else o

    (q8, qs), (k8, ks), (v8, vs) = quantize_attention_inputs(q, k, v)
    compiled = torch.compile(fp8_attention, dynamic=False)
    row['bf16_ms'] = timed(lambda: first(mod.flash_attn_func(q, k, v)), reps)
    row['fp8_kernel_ms'] = timed(lambda: first(mod.flash_attn_func(
        q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)), reps)
    row['fp8_eager_ms'] = timed(lambda: fp8_attention(q, k, v), reps)
    row['fp8_compiled_ms'] = timed(lambda: compiled(q, k, v), reps)
    for key in ('bf16', 'fp8_kernel', 'fp8_eager', 'fp8_compiled'):
        row[f'{key}_tflops'] = tflops(flop, row[f'{key}_ms'])
    rows = min(REF_ROWS, tokens)
    ref = _ref_attention(q, k, v, rows)
    row['err_bf16'] = rel(first(mod.flash_attn_func(q, k, v))[:, :rows], ref)
    row['err_fp8'] = rel(compiled(q, k, v)[:, :rows], ref)
    row['err_fp8_no_smoothing'] = rel(fp8_attention(q, k, v, smooth_k=False)[:, :rows], ref)
    row['speedup_compiled'] = row['bf16_ms'] / row['fp8_compiled_ms']
    return row


def check_attention_emulation() -> dict:
    """The kernel against its emulation on a small shape: descale semantics and P rounding."""
    q, k, v = _qkv(2, 1024, 4, HEAD_DIM, 1.0, seed=3)
    out = fp8_attention(q, k, v)
    exact = _ref_attention(q, k, v, q.shape[1])
    return {'shape': list(q.shape),
            'kernel_vs_emulation': rel(out, fp8_attention_reference(q, k, v, round_probs=True)),
            'kernel_vs_emulation_without_prob_rounding': rel(out, fp8_attention_reference(q, k, v)),
            'kernel_vs_exact': rel(out, exact),
            'emulation_vs_exact': rel(fp8_attention_reference(q, k, v, round_probs=True), exact)}


# ----------------------------------------------------------------------------- report
def print_table(title, rows, cols):
    print(f'\n{title}')
    print('  '.join(f'{c:>14}' for c in cols))
    for r in rows:
        print('  '.join(f'{r[c]:>14.4g}' if isinstance(r[c], float) else f'{r[c]:>14}'
                        for c in cols))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--output', required=True, help='JSON results file to write')
    p.add_argument('--tokens', type=int, nargs='+', default=[32760, 75600])
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--key_offset', type=float, default=1.0,
                   help='std of the per-channel offset added to the random keys')
    p.add_argument('--skip', nargs='*', default=[], choices=['linear', 'mlp', 'attention'])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print('fp8_check: no CUDA device; this script measures GPU kernels only')
        return 1
    res = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
           'capability': list(torch.cuda.get_device_capability()),
           'git_commit': os.environ.get('GIT_COMMIT'), 'data': 'random', 'reps': args.reps}
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in full fp32
    t_start = time.perf_counter()
    if 'linear' not in args.skip:
        res['linear'] = [check_linear(m, k, n, args.reps) for m in args.tokens
                         for k, n in ((DIM, DIM), (DIM, FFN), (FFN, DIM))]
        print_table('linear (eager)', res['linear'],
                    ['tokens', 'k', 'n', 'bf16_tflops', 'fp8_gemm_tflops',
                     'fp8_gemm_fast_accum_tflops', 'fp8_linear_eager_tflops', 'err_bf16',
                     'err_fp8', 'err_fp8_fast_accum'])
    if 'mlp' not in args.skip:
        res['mlp'] = [check_mlp(m, args.reps) for m in args.tokens]
        print_table('block MLP (LayerNorm, modulation, Linear, GELU, Linear)', res['mlp'],
                    ['tokens', 'bf16_compiled_ms', 'fp8_compiled_ms', 'fp8_eager_ms',
                     'bf16_compiled_tflops', 'fp8_compiled_tflops', 'speedup_compiled',
                     'err_bf16', 'err_fp8'])
    if 'attention' not in args.skip:
        if fp8_attention_available():
            res['attention_emulation'] = check_attention_emulation()
            print('\nattention kernel vs emulation:', json.dumps(res['attention_emulation']))
            res['attention'] = [check_attention(m, args.reps, args.key_offset)
                                for m in args.tokens]
            print_table('attention (40 heads x 128, non-causal)', res['attention'],
                        ['tokens', 'bf16_tflops', 'fp8_kernel_tflops', 'fp8_eager_tflops',
                         'fp8_compiled_tflops', 'speedup_compiled', 'err_bf16', 'err_fp8',
                         'err_fp8_no_smoothing'])
        else:
            res['attention'] = {'skipped': 'FA3 (flash_attn_interface or fa3-fwd) on a '
                                           'Hopper GPU not found'}
            print('\nattention skipped:', res['attention']['skipped'])
    res['seconds'] = time.perf_counter() - t_start
    tmp = args.output + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, args.output)
    print(f'\nwrote {args.output} ({res["seconds"]:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
