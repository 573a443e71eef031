"""Every ```python block of README.md and docs/*.md runs as written.

A block runs in a fresh temporary folder. The files it reads are named in an
HTML comment on the line before its fence, ``<!-- needs: scene.tif, captions.csv -->``;
the test makes them (:data:`MAKERS`: a small synthetic scene, a caption file of
synthetic chips), so the examples stay runnable without data or downloads.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS = re.compile(r"<!--\s*needs:\s*(.*?)\s*-->")


def python_blocks(path: Path):
    """(line of the fence, code, files it needs) of every ```python block in ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            need = NEEDS.search(lines[start - 2]) if start >= 2 else None
            files = [f.strip() for f in need.group(1).split(",")] if need else []
            blocks.append((start, "\n".join(body) + "\n", files))
        i += 1
    return blocks


def make_scene_file(path: Path) -> None:
    from mapclip.engine.data.synthetic.scene import make_scene
    make_scene(str(path), 512, seed=7)


def make_captions_file(path: Path) -> None:
    """Synthetic chips with counted objects and their captions, one row each."""
    from mapclip.engine.data.grammar import with_count
    from mapclip.engine.data.synthetic.scene import make_chip
    chips = path.parent / "chips"
    chips.mkdir()
    rows = ["image,caption"]
    for i, (cls, n) in enumerate((c, n) for c in ("storage-tank", "ship") for n in range(1, 7)):
        chip = chips / f"{cls}-{n}.tif"
        make_chip(str(chip), cls, n, size=128, seed=i)
        rows.append(f"{chip},{with_count(cls.replace('-', ' '), n)} on the ground")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


MAKERS = {"scene.tif": make_scene_file, "captions.csv": make_captions_file}
BLOCKS = [(doc, line, code, files) for doc in DOCS for line, code, files in python_blocks(doc)]


def test_the_docs_hold_python_examples_and_name_only_files_the_test_can_make():
    docs = {doc.name for doc, *_ in BLOCKS}
    assert {"detect.md", "caption.md", "finetune.md", "raster.md", "demo.md"} <= docs
    assert {f for *_, files in BLOCKS for f in files} <= set(MAKERS)


def test_needs_comment_is_read_from_the_line_before_the_fence(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n<!-- needs: scene.tif, captions.csv -->\n```python\nx = 1\n```\n"
                   "```python\ny = 2\n```\n")
    assert python_blocks(doc) == [(3, "x = 1\n", ["scene.tif", "captions.csv"]), (6, "y = 2\n", [])]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("doc, line, code, files", BLOCKS,
                         ids=[f"{doc.relative_to(ROOT)}:{line}" for doc, line, *_ in BLOCKS])
def test_python_example_runs_as_written(doc, line, code, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in files:
        MAKERS[name](tmp_path / name)
    exec(compile(code, f"{doc.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__doc_example__"})
