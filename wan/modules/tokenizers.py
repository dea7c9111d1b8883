"""Tokenizers for the umT5 text encoder (docs/TEXT_ENCODER.md#tokenizer-and-prompt-cleaning).

`HuggingfaceTokenizer` wraps a local `transformers` tokenizer folder (the released
`google/umt5-xxl` folder) and applies Wan's prompt cleaning before tokenizing.
`ByteTokenizer` is a dependency-free stand-in with the same call interface, used by
`--random_init` runs when no tokenizer folder exists: it never touches the network or disk.

`transformers` is imported lazily (inside `HuggingfaceTokenizer`) so that importing this module
is cheap and cannot touch CUDA.
"""
from __future__ import annotations

import html
import os
import re
import string
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'HuggingfaceTokenizer', 'ByteTokenizer', 'basic_clean', 'whitespace_clean', 'canonicalize',
    'clean_text', 'CLEAN_MODES',
]

CLEAN_MODES = (None, 'whitespace', 'lower', 'canonicalize')

TokenizerOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def basic_clean(text: str) -> str:
    """Repair mojibake and HTML entities, then strip (steps 1-3 of
    docs/TEXT_ENCODER.md#tokenizer-and-prompt-cleaning).

    html.unescape runs twice because scraped prompts are often double-escaped
    ('&amp;amp;' -> '&amp;' -> '&').
    """
    import ftfy  # imported here: only needed when cleaning is requested
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace (incl. newlines and tabs) into one space, then strip."""
    return re.sub(r'\s+', ' ', text).strip()


def canonicalize(text: str) -> str:
    """Lower-case, '_' -> ' ', drop ASCII punctuation, collapse whitespace."""
    text = text.replace('_', ' ')
    text = text.translate(str.maketrans('', '', string.punctuation))
    text = text.lower()
    return whitespace_clean(text)


def clean_text(text: str, mode: Optional[str]) -> str:
    """Apply one of the cleaning modes: None, 'whitespace', 'lower' or 'canonicalize'.

    Wan's T5 uses 'whitespace' (no lower-casing, no punctuation removal); the other modes exist
    for compatibility with the reference tokenizer wrapper.
    """
    if mode is None:
        return text
    if mode == 'whitespace':
        return whitespace_clean(basic_clean(text))
    if mode == 'lower':
        return whitespace_clean(basic_clean(text)).lower()
    if mode == 'canonicalize':
        return canonicalize(basic_clean(text))
    raise ValueError(f'unknown clean mode {mode!r}; expected one of {CLEAN_MODES}')


def _check_clean_mode(clean: Optional[str]) -> None:
    if clean not in CLEAN_MODES:
        raise ValueError(f'unknown clean mode {clean!r}; expected one of {CLEAN_MODES}')


def _as_list(sequence: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(sequence, str):
        return [sequence]
    return list(sequence)


def _load_local_tokenizer(name: str, **kwargs):
    """Load a tokenizer without ever downloading.

    A folder is loaded directly. An absolute (or otherwise path-like) name that does not exist
    is an error naming the folder. A bare relative name such as 'google/umt5-xxl' is also
    tried against the local Hugging Face cache (local_files_only), because that is what a user
    who already has the tokenizer cached expects; if that fails too, the error names the
    folder that was looked for.
    """
    from transformers import AutoTokenizer

    if os.path.isdir(name):
        return AutoTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
    where = os.path.abspath(name)
    if os.path.isabs(name) or os.path.exists(name) or name.startswith('.'):
        raise FileNotFoundError(f'tokenizer folder not found: looked for {where}')
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f'tokenizer folder not found: looked for {where} (and no copy of {name!r} in the '
            f'local Hugging Face cache; downloads are disabled)') from exc


class HuggingfaceTokenizer:
    """A local `transformers` tokenizer with Wan's prompt cleaning and fixed-length padding.

    Args:
        name: tokenizer folder (e.g. '<checkpoint_dir>/google/umt5-xxl').
        seq_len: if set, every call pads/truncates to exactly this many tokens.
        clean: None, 'whitespace' (what Wan uses), 'lower' or 'canonicalize'.
        **kwargs: forwarded to `AutoTokenizer.from_pretrained`.
    """

    def __init__(self, name: str, seq_len: Optional[int] = None, clean: Optional[str] = None,
                 **kwargs) -> None:
        _check_clean_mode(clean)
        if name is None:
            raise ValueError('HuggingfaceTokenizer needs a tokenizer folder (name=None given)')
        self.name = name
        self.seq_len = seq_len
        self.clean = clean
        self.tokenizer = _load_local_tokenizer(name, **kwargs)
        self.vocab_size = self.tokenizer.vocab_size

    def __call__(self, sequence: Union[str, Sequence[str]], return_mask: bool = False,
                 add_special_tokens: bool = True, **kwargs) -> TokenizerOutput:
        """Tokenize a string or a list of strings into an int64 (B, seq_len) tensor.

        Returns ids, or (ids, mask) with `return_mask=True`; mask is 1 on real tokens (EOS
        included) and 0 on padding.
        """
        call_kwargs = {'return_tensors': 'pt', 'add_special_tokens': add_special_tokens}
        if self.seq_len is not None:
            call_kwargs.update(padding='max_length', truncation=True, max_length=self.seq_len)
        call_kwargs.update(kwargs)

        texts = [clean_text(u, self.clean) for u in _as_list(sequence)]
        encoded = self.tokenizer(texts, **call_kwargs)
        if return_mask:
            return encoded.input_ids, encoded.attention_mask
        return encoded.input_ids


class ByteTokenizer:
    """Byte-level tokenizer with umT5's special-token layout, for checkpoint-free runs.

    ids: pad 0, eos 1 (appended to every text), unk 2 (never produced), then utf-8 byte b ->
    b + 3. `vocab_size` is 259, so any encoder with at least 259 embedding rows accepts it.
    Truncation keeps at most `seq_len` tokens including EOS, like the umT5 tokenizer.
    """

    pad_id = 0
    eos_id = 1
    unk_id = 2
    offset = 3
    vocab_size = 256 + offset

    def __init__(self, seq_len: Optional[int] = None, clean: Optional[str] = 'whitespace') -> None:
        _check_clean_mode(clean)
        if seq_len is not None and seq_len < 1:
            raise ValueError(f'seq_len must be positive, got {seq_len}')
        self.seq_len = seq_len
        self.clean = clean

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of one text, truncated to seq_len (EOS kept last when added)."""
        ids = [b + self.offset for b in clean_text(text, self.clean).encode('utf-8')]
        if self.seq_len is not None:
            # Keep room for EOS so that a truncated text still ends with it, as umT5 does.
            ids = ids[:self.seq_len - 1] if add_special_tokens else ids[:self.seq_len]
        if add_special_tokens:
            ids.append(self.eos_id)
        return ids

    def __call__(self, sequence: Union[str, Sequence[str]], return_mask: bool = False,
                 add_special_tokens: bool = True) -> TokenizerOutput:
        rows = [self.encode(u, add_special_tokens) for u in _as_list(sequence)]
        # Without seq_len, pad to the longest text (so a batch is always one rectangular tensor).
        length = self.seq_len if self.seq_len is not None else max([len(r) for r in rows] + [0])
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        if return_mask:
            return ids, mask
        return ids

