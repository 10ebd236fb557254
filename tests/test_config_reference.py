"""The configuration reference (docs/reference/configuration.md) is generated from conf/ and up to date.

The page is only worth reading if it is current and every key says what it means, so a config
change without `make docs-reference`, or a new key without a comment, fails here.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "tools" / "config_reference.py"
PAGE = ROOT / "docs" / "reference" / "configuration.md"
ROW = re.compile(r"^\| `([^`]+)` \|")


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    # docs/tools is no package: load the script by path (registered first, as dataclasses need).
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sections(page: str) -> dict[str, list[str]]:
    """The lines of the page under each ``###`` heading, by heading text."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in page.splitlines():
        if line.startswith("### "):
            current = out.setdefault(line[4:], [])
        elif line.startswith("## "):
            current = []
        else:
            current.append(line)
    return out


def test_committed_page_is_current(reference: ModuleType) -> None:
    assert PAGE.is_file(), f"{PAGE.relative_to(ROOT)} is missing: run `make docs-reference`"
    assert PAGE.read_text(encoding="utf-8") == reference.render(), (
        f"{PAGE.relative_to(ROOT)} is out of date with conf/: run `make docs-reference` and commit it")


def test_every_key_has_a_comment(reference: ModuleType) -> None:
    missing = []
    for heading, lines in sections(reference.render()).items():
        for line in lines:
            if ROW.match(line) and line.rstrip().endswith("|  |"):
                missing.append(f"{heading}: {ROW.match(line).group(1)}")
    # A comment block at the very top of a file is its header: a blank line separates it from the
    # first key's own comment.
    assert not missing, "keys without a comment (add one above the key in conf/):\n" + "\n".join(missing)
    assert reference.undocumented() == []


def test_renaming_a_key_changes_the_page(reference: ModuleType, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    fne = conf / "loss" / "fne.yaml"
    text = fne.read_text(encoding="utf-8")
    assert text.count("\ncutdown: ") == 1
    fne.write_text(text.replace("\ncutdown: ", "\ncut_down_renamed: "), encoding="utf-8")

    page = reference.render(conf)
    assert page != PAGE.read_text(encoding="utf-8")
    keys = [m.group(1) for line in sections(page)["loss=fne"] if (m := ROW.match(line))]
    assert "cut_down_renamed" in keys and "cutdown" not in keys
    # The page names files relative to the repository, wherever conf/ was read from.
    assert str(tmp_path) not in page


def test_check_mode(reference: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("stale\n", encoding="utf-8")
    monkeypatch.setattr(reference, "OUTPUT", stale)
    assert reference.main(["--check"]) == 1
    assert "docs/reference/configuration.md is out of date" in capsys.readouterr().err
    assert stale.read_text(encoding="utf-8") == "stale\n"  # --check writes nothing
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0
    assert stale.read_text(encoding="utf-8") == reference.render()


def test_comment_conventions(reference: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "option.yaml").write_text(
        "# The header.\n"
        "\n"
        "# Above the key.\n"
        "plain: 1.0e-4  # and inline\n"
        "quoted: 'a # b'  # not the quoted one\n"
        "# A note that belongs to no key.\n"
        "\n"
        "# The mapping.\n"
        "outer:\n"
        "  # Nested, in a table cell: a | b.\n"
        "  inner: [x, \"${paths.cache_dir}/y\"]\n"
        "bare: ???\n", encoding="utf-8")
    config = reference.scan(tmp_path / "group" / "option.yaml", tmp_path)
    assert config.header == ["The header."] and config.notes == [["A note that belongs to no key."]]
    assert [(k.path, k.value, k.comment) for k in config.keys] == [
        ("plain", "1.0e-4", "Above the key. and inline"),
        ("quoted", "'a # b'", "not the quoted one"),
        ("outer", "", "The mapping."),
        ("outer.inner", '[x, "${paths.cache_dir}/y"]', "Nested, in a table cell: a | b."),
        ("bare", "???", ""),
    ]
    page = reference.render(tmp_path)
    assert "| `outer.inner` | `[x, \"${paths.cache_dir}/y\"]` | Nested, in a table cell: a \\| b. |" in page
    assert reference.undocumented(tmp_path) == ["conf/group/option.yaml: bare"]
