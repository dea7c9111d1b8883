"""bench/attention_check.py: the log-sum-exp merge of two key halves is attention over all
keys, and the diagnostic runs end to end on the CPU (--tiny)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from bench.attention_check import _lse_merge


def _attention_with_lse(q, k, v):
    """Reference attention (B, L, H, D) and its log-sum-exp (B, H, L), in float64."""
    s = torch.einsum('blhd,bmhd->bhlm', q, k) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum('bhlm,bmhd->blhd', torch.softmax(s, dim=-1), v)
    return out, lse


def test_lse_merge_of_key_halves_is_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k = k * 3  # peaked softmax rows: the merge's weights far from one half each
    full, _ = _attention_with_lse(q, k, v)
    o1, l1 = _attention_with_lse(q, k[:, :10], v[:, :10])
    o2, l2 = _attention_with_lse(q, k[:, 10:], v[:, 10:])
    merged = _lse_merge(o1, l1, o2, l2)
    # the merge computes in fp32 (as it would on bf16 kernel outputs)
    assert merged.dtype == torch.float64
    assert torch.allclose(merged, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(o1, full, atol=1e-3)  # one half alone is not the answer


def test_attention_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / 'attention.json'
    subprocess.run([sys.executable, 'bench/attention_check.py', '--tiny', '--sizes', '832*480',
                    '--reps', '2', '--output', str(out)], check=True, capture_output=True)
    data = json.loads(out.read_text())
    row = data['sizes']['832*480']['variants']['sdpa']
    assert row['seconds'] > 0 and row['rel_err_vs_first_exact'] == 0.0
    qkv = data['sizes']['832*480']['qkv_projection']
    assert qkv['separate']['seconds'] > 0 and qkv['fused']['seconds'] > 0
    assert qkv['max_abs_diff'] < 1e-4  # the same dot products (fp32 on the CPU)
    between = data['sizes']['832*480']['attention_between_gemms']
    assert between['backend'] == 'sdpa' and between['between_over_back_to_back'] > 0
