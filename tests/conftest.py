"""Shared fixtures: the repository root on sys.path, one tiny pipeline per session and that
pipeline written once in the released checkpoint layout.

Building a t2v-tiny pipeline takes about a second; tests that need a fresh one (different
dtype, weights written to disk, optimized upgrade) build their own.
"""
from __future__ import annotations

import logging
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope='session')
def tiny_cfg():
    from wan.configs import WAN_CONFIGS
    return WAN_CONFIGS['t2v-tiny']


@pytest.fixture(scope='session')
def tiny_pipe(tiny_cfg):
    """The reference pipeline on the tiny config, random weights, CPU (bf16 autocast)."""
    from wan.text2video import WanT2V
    return WanT2V(tiny_cfg, None, random_init=True, device='cpu')


@pytest.fixture
def one_thread():
    """Run on one CPU thread: CPU kernels (VAE convs, reductions) may round differently with
    other thread counts, and bit-for-bit comparisons need one."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_logging():
    """Undo the CLIs' logging.basicConfig(force=True) after a test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# the word-level vocabulary of the tokenizer in `released_ckpt` ('a' is 3, 'cat' 4, '</s>' 1)
TOKENS = ['<pad>', '</s>', '<unk>', 'a', 'cat', 'plays', 'the', 'piano', 'dog']


def _write_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOKENS)}, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single='$A </s>', pair='$A </s> $B </s>', special_tokens=[('</s>', 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='</s>',
                            unk_token='<unk>').save_pretrained(str(folder))


@pytest.fixture(scope='session')
def released_ckpt(tmp_path_factory, tiny_pipe):
    """`tiny_pipe` written in the released checkpoint layout: T5 and VAE .pth files, each
    expert in several safetensors shards with an index, a real tokenizer folder. Shared by
    the session: read it, link it or copy it, never change it."""
    import torch
    ckpt = tmp_path_factory.mktemp('released') / 'Wan2.2-T2V-tiny'
    ckpt.mkdir()
    torch.save(tiny_pipe.text_encoder.model.state_dict(), ckpt / 'models_t5_umt5-xxl-enc-bf16.pth')
    torch.save(tiny_pipe.vae.model.state_dict(), ckpt / 'Wan2.1_VAE.pth')
    for sub in ('low_noise_model', 'high_noise_model'):
        getattr(tiny_pipe, sub).save_pretrained(str(ckpt / sub), max_shard_bytes=200_000)
    _write_tokenizer(ckpt / 'google' / 'umt5-xxl')
    return ckpt


@pytest.fixture
def no_model_build(monkeypatch):
    """Building or loading any model (or generate.py's pipeline) fails the test."""
    import generate
    import wan.text2video as t2v

    def boom(*a, **k):
        raise AssertionError('a model was built before the inputs were checked')

    monkeypatch.setattr(t2v, 'T5EncoderModel', boom)
    monkeypatch.setattr(t2v, 'Wan2_1_VAE', boom)
    monkeypatch.setattr(t2v.WanModel, 'from_pretrained', boom)
    monkeypatch.setattr(t2v.WanModel, 'from_source', boom)
    monkeypatch.setattr(t2v.WanModel, 'from_random', boom)
    monkeypatch.setattr(generate, 'build_pipeline', boom)
