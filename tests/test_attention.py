"""The attention entry point: reference varlen semantics, dtypes, backend selection (CPU)."""
import pytest
import torch

from wan.modules.attention import attention, flash_attention, resolve_backend


def _manual(q, k, v, k_len, scale):
    """Per-sample softmax(q k^T * scale) v over the first k_len keys, in fp32."""
    s = torch.einsum('qhd,khd->hqk', q.float(), k[:k_len].float()) * scale
    return torch.einsum('hqk,khd->qhd', s.softmax(-1), v[:k_len].float())


def test_varlen_semantics_match_per_sample_loop():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 16) for _ in range(3))
    k_lens = torch.tensor([10, 6])
    out = attention(q, k, v, k_lens=k_lens)
    assert out.shape == q.shape and out.dtype == torch.float32  # q's dtype back
    for b in range(2):
        # the kernel sees bf16 inputs (reference cast); queries are not trimmed
        ref = _manual(q[b].bfloat16(), k[b].bfloat16(), v[b].bfloat16(), int(k_lens[b]),
                      16 ** -0.5)
        torch.testing.assert_close(out[b], ref, rtol=2e-2, atol=2e-2)
    # keys beyond k_len are really excluded: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, 6:] = 100.0
    v2[1, 6:] = -50.0
    torch.testing.assert_close(attention(q, k2, v2, k_lens=k_lens), out, rtol=0, atol=0)


def test_fp32_dtype_and_q_lens():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 7, 2, 8) for _ in range(3))
    out = attention(q, k, v, q_lens=torch.tensor([7, 4]), k_lens=torch.tensor([5, 7]),
                    dtype=torch.float32)
    torch.testing.assert_close(out[0], _manual(q[0], k[0], v[0], 5, 8 ** -0.5))
    torch.testing.assert_close(out[1, :4], _manual(q[1, :4], k[1], v[1], 7, 8 ** -0.5))
    assert torch.all(out[1, 4:] == 0)
    # softmax_scale and q_scale
    out = attention(q, k, v, softmax_scale=0.3, q_scale=2.0, dtype=torch.float32)
    torch.testing.assert_close(out[0], _manual(q[0] * 2.0, k[0], v[0], 7, 0.3))


def test_half_inputs_kept_and_output_in_q_dtype():
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.bfloat16) for _ in range(3))
    assert attention(q, k, v).dtype == torch.bfloat16
    assert flash_attention(q.float(), k, v).dtype == torch.float32


def test_backend_resolution_on_cpu():
    assert resolve_backend('auto', 'cpu') == 'sdpa'
    assert resolve_backend('reference', 'cpu') == 'sdpa'
    with pytest.raises(RuntimeError, match='needs a CUDA device'):
        resolve_backend('fa3', 'cpu')
    with pytest.raises(RuntimeError, match='needs a CUDA device'):
        resolve_backend('fa3_fp8', 'cpu')
    with pytest.raises(ValueError, match='unknown attention backend'):
        resolve_backend('nope', 'cpu')
    assert resolve_backend(None, 'cpu') == 'sdpa'  # None: the 'reference' policy
    with pytest.raises(ValueError, match='dropout'):
        attention(*(torch.randn(1, 2, 1, 4) for _ in range(3)), dropout_p=0.1)


def test_registry_is_the_one_list_of_kernels():
    from wan.modules.attention import (ATTENTION_CHOICES, AUTO_ORDER, BACKENDS, LOSSY,
                                       REGISTRY, available_backends)
    assert set(AUTO_ORDER) | set(LOSSY) == set(BACKENDS) == set(REGISTRY)
    assert not set(AUTO_ORDER) & set(LOSSY)  # 'auto' never picks a lossy kernel
    assert ATTENTION_CHOICES == ('auto', 'reference') + BACKENDS
    assert available_backends()[-1] == 'sdpa'  # always there, CPU included
    # every kernel that needs no GPU gives the reference semantics through attention()
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 6, 2, 8) for _ in range(3))
    k_lens = torch.tensor([6, 3])
    for name, entry in REGISTRY.items():
        if entry.needs_cuda or not entry.available():
            continue
        out = attention(q, k, v, k_lens=k_lens, dtype=torch.float32, backend=name)
        torch.testing.assert_close(out[1], _manual(q[1], k[1], v[1], 3, 8 ** -0.5))
