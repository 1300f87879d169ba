"""README, docs/ pages and the apps' READMEs: every relative link resolves, and the README stays short.

A relative link must name a file or folder of the checkout, and its ``#anchor`` (or a same-page
``#anchor``) a heading of the Markdown file it points at, slugged as GitHub slugs headings. Planted
once: a link to ``docs/benchmark.md`` (no such page) and an anchor ``#quik-start`` both failed
``test_relative_links_resolve``; a README of 310 lines failed ``test_readme_fits_on_a_few_screens``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    """README.md, every Markdown page under docs/ and the apps' READMEs."""
    pages = [*(ROOT / "docs").rglob("*.md"), *(ROOT / "apps").rglob("*.md")]
    return [ROOT / "README.md", *sorted(pages)]


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's ``-1``, ``-2`` suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file or anchor does not exist, as ``target (why)``."""
    broken = []
    for line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto: ...
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{target} (no heading with anchor #{anchor})")
    return broken


def test_relative_links_resolve():
    problems = {str(p.relative_to(ROOT)): broken_links(p) for p in markdown_files()}
    assert not {name: links for name, links in problems.items() if links}


def test_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_slug_follows_github():
    assert slug("Core ML (`--target coreml`)") == "core-ml---target-coreml"
    assert slug("What mf-edge refuses, and why") == "what-mf-edge-refuses-and-why"
    assert slug("ConvFormer-S18 and CAFormer-S18 at 224 px") == "convformer-s18-and-caformer-s18-at-224-px"
    assert slug("Accuracy: benchmarks/ptq_accuracy.py") == "accuracy-benchmarksptq_accuracypy"
