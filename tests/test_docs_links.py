"""Every pointer into docs/ from the code, the tests and the documents names a file and a
heading that exist, and no comment points at files outside this repository."""
from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r'docs/([A-Z_]+\.md)(#[a-z0-9-]+)?')


def _anchor(heading: str) -> str:
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return '#' + text.replace(' ', '-')


def _anchors(path: str) -> set:
    with open(path, encoding='utf-8') as f:
        return {_anchor(line.lstrip('#')) for line in f if line.startswith('#')}


def _sources():
    pats = ['wan/**/*.py', '*.py', 'bench/*.py', 'tests/*.py', '*.md', 'docs/*.md']
    for pat in pats:
        yield from glob.glob(os.path.join(ROOT, pat), recursive=True)


def test_docs_pointers_resolve():
    bad = []
    for path in _sources():
        with open(path, encoding='utf-8') as f:
            text = f.read()
        for m in LINK.finditer(text):
            doc = os.path.join(ROOT, 'docs', m.group(1))
            if not os.path.isfile(doc):
                bad.append(f'{os.path.relpath(path, ROOT)}: {m.group(0)} (no such file)')
            elif m.group(2) and m.group(2) not in _anchors(doc):
                bad.append(f'{os.path.relpath(path, ROOT)}: {m.group(0)} (no such heading)')
    assert not bad, '\n'.join(bad)


def test_no_pointers_outside_the_repository():
    bad = []
    for path in _sources():
        if os.path.relpath(path, ROOT).startswith('tests/test_docs_links'):
            continue
        with open(path, encoding='utf-8') as f:
            for i, line in enumerate(f, 1):
                if re.search(r'REFERENCE\.md|PERFORMANCE\.md|API\.md', line):
                    bad.append(f'{os.path.relpath(path, ROOT)}:{i}: {line.strip()}')
    assert not bad, '\n'.join(bad)
