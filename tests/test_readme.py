"""The README is a front page: short, its links resolve, and its expected output is the docs' own.

The Sphinx build (``make docs``) checks every link of the docs pages; the README is not part of the
site, so its links are checked here: each relative link names a file of the repository and, with
an anchor, a heading of that Markdown file (GitHub's and MyST's slugs).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading (MyST's ``myst_heading_anchors`` makes the same ones)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1", "", path.read_text(), flags=re.S | re.M)  # not inside code blocks
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?)\s*$", text, flags=re.M)}


def fenced(text: str, lang: str) -> list[list[str]]:
    """The bodies of the fenced blocks of ``lang``, as lists of lines."""
    return [m.group(1).splitlines() for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)]


def test_readme_is_a_front_page() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_readme_links_resolve_to_files_and_headings() -> None:
    checked = 0
    for target in LINK.findall(README.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (README.parent / path) if path else README
        assert file.exists(), f"README.md links to {target}: no such file"
        if anchor:
            assert file.suffix == ".md", f"README.md links to {target}: an anchor into a non-Markdown file"
            assert anchor in anchors(file), f"README.md links to {target}: no heading with that anchor in {path}"
        checked += 1
    assert checked >= 10


def test_slug_matches_a_heading_with_code_and_punctuation() -> None:
    assert slug("Continue a run: `resume=<run dir>`") == "continue-a-run-resumerun-dir"
    assert slug("The summary, line by line") == "the-summary-line-by-line"


def test_readme_output_is_an_excerpt_of_the_getting_started_output() -> None:
    """The README shows a shortened copy of the default run's output; the full one, with every line
    explained, is on docs/getting-started.md. Each README line must be a line of that block, in the
    same order, so the two cannot drift apart (the number lives on the getting-started page)."""
    (readme_block,) = fenced(README.read_text(), "text")
    (full,) = fenced((ROOT / "docs" / "getting-started.md").read_text(), "text")
    position = 0
    for line in readme_block:
        assert line in full[position:], f"README's output line not in docs/getting-started.md (in order): {line!r}"
        position = full.index(line, position) + 1
