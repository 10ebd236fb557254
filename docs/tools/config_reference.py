"""Generate ``docs/reference/configuration.md``, the configuration reference, from ``conf/``.

Every YAML file under ``conf/`` becomes a section: the primary configs (``train.yaml``,
``evaluate.yaml``, ...) first, then each config group (``loss``, ``loss/tuning``,
``hydra/launcher``, ...) with one subsection per option. A section holds the comment block at
the top of its file, its defaults list and a table of every key it sets, with its default as
written in the file and the comment attached to it. So the reference cannot drift from the
configs: ``tests/test_config_reference.py`` compares the committed page with a fresh
generation and fails on any key without a comment.

The comment conventions this reads (PyYAML drops comments, so a small line scan finds them):

* the file's header is its leading block of comment lines (after ``# @package ...``) up to the
  first blank or non-comment line; a blank line separates it from the first key's own comment;
* a key's comment is the block of comment lines directly above it (no blank line between) plus
  an inline ``# ...`` after its value on the key's own line;
* any other comment block (a paragraph separated from the next key by a blank line) is kept as
  a note of its file, so nothing written in ``conf/`` is lost from the page.

Run ``python docs/tools/config_reference.py`` (``make docs-reference``) to write the page,
``--check`` to only compare (exit 1 when it is out of date).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
OUTPUT = ROOT / "docs" / "reference" / "configuration.md"
# How the page names itself and its sources (relative, so the output has no absolute paths).
OUTPUT_NAME = "docs/reference/configuration.md"
COMMAND = "make docs-reference"
# The entry points' primary configs, in the order a reader meets them.
PRIMARY = ("train", "evaluate", "export", "make_shards")
ENTRY_MODULES = {name: f"fne_lightning.{name}" for name in PRIMARY}

_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)")
# Markdown characters that would start emphasis, links, raw HTML, roles or table cells in prose;
# an underscore only where it can (CommonMark never reads one inside a word as emphasis).
_SPECIAL = re.compile(r"([\\*\[\]<|{}]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
_CODE_SPAN = re.compile(r"`[^`]+`")


@dataclass
class Key:
    """One key of a config file: its dotted path, its default as written and its comment."""

    path: str
    value: str  # "" for a block mapping (its keys follow as rows of their own)
    comment: str


@dataclass
class ConfigFile:
    """What the reference shows of one YAML file under ``conf/``."""

    rel: str  # path relative to conf/, e.g. "loss/fne.yaml"
    group: str  # "" for a primary config, else e.g. "loss/tuning"
    option: str  # file stem
    package: str | None  # "# @package" directive, if any
    header: list[str]  # comment lines (without "# "), blank lines kept as ""
    defaults: list[str]  # the raw lines of the defaults list, comments included
    keys: list[Key] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)  # comment blocks attached to no key


# ------------------------------------------------------------------------------ scanning
def _comment_text(line: str) -> str | None:
    """The text of a whole-line comment (without ``#`` and one space), or None for other lines."""
    stripped = line.strip()
    if not stripped.startswith("#"):
        return None
    text = stripped[1:]
    return text[1:] if text.startswith(" ") else text


def _inline_comment(line: str) -> str:
    """The ``# ...`` after a value on a key's line; ``#`` inside quotes or words is not one."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i > 0 and line[i - 1] in " \t":
            return line[i + 1:].strip()
    return ""


def _render_node(node: yaml.Node, text: str) -> str:
    """A value as written in the file, on one line (block sequences written inline)."""
    if isinstance(node, yaml.ScalarNode):
        if node.style in ("|", ">"):
            return " ".join(node.value.split())
        raw = text[node.start_mark.index:node.end_mark.index].strip()
        return raw if raw else "null"  # `key:` with nothing after it
    if getattr(node, "flow_style", False):
        return " ".join(text[node.start_mark.index:node.end_mark.index].split())
    if isinstance(node, yaml.SequenceNode):
        return "[" + ", ".join(_render_node(item, text) for item in node.value) + "]"
    pairs = (f"{_render_node(k, text)}: {_render_node(v, text)}" for k, v in node.value)
    return "{" + ", ".join(pairs) + "}"


def _last_line(node: yaml.Node) -> int:
    """The last line (0-based) a node's own text occupies."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        end = node.end_mark
        return end.line if end.column > 0 else end.line - 1
    children: list[yaml.Node] = []
    for item in node.value:
        children.extend(item if isinstance(item, tuple) else (item,))
    return max((_last_line(child) for child in children), default=node.start_mark.line)


def _walk(node: yaml.MappingNode, prefix: str, lines: list[str], text: str,
          used: set[int]) -> Iterator[Key]:
    """Every key of a block mapping, parents before their children, in file order."""
    for key_node, value_node in node.value:
        line = key_node.start_mark.line
        above: list[str] = []
        i = line - 1
        while i >= 0 and i not in used and (comment := _comment_text(lines[i])) is not None:
            above.insert(0, comment)
            used.add(i)
            i -= 1
        inline = _inline_comment(lines[line])
        comment = " ".join(" ".join([*above, inline]).split())
        path = f"{prefix}{key_node.value}"
        if isinstance(value_node, yaml.MappingNode) and not value_node.flow_style and value_node.value:
            yield Key(path, "", comment)
            yield from _walk(value_node, f"{path}.", lines, text, used)
        else:
            yield Key(path, _render_node(value_node, text), comment)


def scan(path: Path, conf_dir: Path) -> ConfigFile:
    """Read one config file: header, defaults list, keys with their comments, loose notes."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rel = path.relative_to(conf_dir).as_posix()
    group = path.parent.relative_to(conf_dir).as_posix()
    used: set[int] = set()  # comment lines already shown (header, defaults, a key's comment)

    start, package = 0, None
    if lines and (match := _PACKAGE.match(lines[0])):
        package, start = match.group(1), 1
        used.add(0)
    header: list[str] = []
    i = start
    while i < len(lines) and (comment := _comment_text(lines[i])) is not None:
        header.append(comment)
        used.add(i)
        i += 1

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    config = ConfigFile(rel, "" if group == "." else group, path.stem, package, header, [])
    if root is None:
        return config
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"conf/{rel}: expected a mapping at the top level")
    body = yaml.MappingNode(root.tag, [])
    for key_node, value_node in root.value:
        if key_node.value == "defaults":
            first, last = key_node.start_mark.line, _last_line(value_node)
            config.defaults = lines[first:last + 1]
            used.update(range(first, last + 1))
        else:
            body.value.append((key_node, value_node))
    config.keys = list(_walk(body, "", lines, text, used))

    # Comment blocks that belong to no key: notes of the file, in file order.
    block: list[str] = []
    for n, line in enumerate([*lines, ""]):
        comment = _comment_text(line)
        if comment is not None and n not in used:
            block.append(comment)
        elif block:
            config.notes.append(block)
            block = []
    return config


def packages(configs: Sequence[ConfigFile]) -> dict[str, str]:
    """Where each group's options land in the composed config (Hydra's default: the group path,
    unless a primary config's defaults list places it with ``group@package``)."""
    placed: dict[str, str] = {}
    for config in configs:
        if config.group:
            continue
        for line in config.defaults:
            entry = line.strip()
            if not entry.startswith("- ") or ":" not in entry:
                continue
            name = entry[2:].split(":", 1)[0].split()[-1]  # drops "optional" / "override"
            if "@" in name:
                group, package = name.split("@", 1)
                placed[group.lstrip("/")] = package
    return placed


# ----------------------------------------------------------------------------- rendering
def _escape(text: str, table: bool = False) -> str:
    """Prose for Markdown: code spans kept, characters that Markdown would read escaped (in a
    table also the ``|`` of code spans, which would otherwise end the cell)."""
    out, pos = [], 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_SPECIAL.sub(r"\\\1", text[pos:match.start()]).replace("`", "\\`"))
        out.append(match.group(0).replace("|", "\\|") if table else match.group(0))
        pos = match.end()
    out.append(_SPECIAL.sub(r"\\\1", text[pos:]).replace("`", "\\`"))
    result = "".join(out)
    # A paragraph must not start a list, a heading or a quote.
    return re.sub(r"^([-+#>]|\d+[.)])", r"\\\1", result)


def _code(value: str) -> str:
    """A value as a code span inside a table cell."""
    if not value:
        return ""
    value = value.replace("|", "\\|")
    fence = "``" if "`" in value else "`"
    return f"{fence}{value}{fence}" if fence == "`" else f"{fence} {value} {fence}"


def _prose(comments: list[str]) -> list[str]:
    """Comment lines as Markdown: paragraphs, with indented lines (commands) as code blocks."""
    out: list[str] = []
    paragraph: list[str] = []
    code: list[str] = []

    def flush() -> None:
        if paragraph:
            out.extend([_escape(" ".join(" ".join(paragraph).split())), ""])
            paragraph.clear()
        if code:
            indent = min(len(c) - len(c.lstrip()) for c in code)
            out.extend(["```text", *(c[indent:].rstrip() for c in code), "```", ""])
            code.clear()

    for comment in comments:
        if not comment.strip():
            flush()
        elif comment.startswith("  "):
            if paragraph:
                flush()
            code.append(comment)
        else:
            if code:
                flush()
            paragraph.append(comment)
    flush()
    return out


def _section(config: ConfigFile, package: str) -> list[str]:
    """The Markdown of one config file below its heading."""
    out = [f"File: `conf/{config.rel}`."]
    if config.package == "_global_":
        out[0] += " `# @package _global_`: its keys are full paths from the root of the config."
    elif package:
        out[0] += f" Its keys are under `{package}`, e.g. `{package}.<key>=...` on the command line."
    elif config.package:
        out[0] += f" `# @package {config.package}`."
    out.append("")
    out += _prose(config.header)
    for note in config.notes:
        out += _prose(note)
    if config.defaults:
        out += ["Defaults list:", "", "```yaml", *config.defaults, "```", ""]
    if not config.keys:
        out += ["Sets no keys of its own.", ""]
        return out
    out += ["| key | default | meaning |", "|---|---|---|"]
    for key in config.keys:
        out.append(f"| {_code(key.path)} | {_code(key.value)} | {_escape(key.comment, table=True)} |")
    out.append("")
    return out


INTRO = f"""\
# Configuration reference

This page is generated by `{COMMAND}` (`python docs/tools/config_reference.py`) from the YAML
files under `conf/`; do not edit it by hand. `tests/test_config_reference.py` compares it with a
fresh generation, so a change to `conf/` without regenerating this page fails the tests, and so
does a key without a comment.

**Choosing and overriding.** A config group is chosen with `group=option` and a key set with its
dotted path, for example `python -m fne_lightning.train loss=vsepp` or
`python -m fne_lightning.train loss.cutdown=0.3`; `+group.key=value` adds a key a config does not
have and `~key` deletes one. `python -m fne_lightning.train --cfg job loss.cutdown=0.3` prints the
composed config without running anything, the quickest way to see what a command line means.

**Reading the tables.** Each option's table lists the keys its own file sets, relative to where
the group lands in the composed config (the `loss` group's `cutdown` is `loss.cutdown`);
experiment and search files (`# @package _global_`) give full paths. An option that extends
another (its defaults list, e.g. `data=coco` over `data=karpathy`) takes every other key from
that one. Defaults are shown as written in the file: `${{...}}` interpolations are resolved when
the config is used (`${{paths.cache_dir}}/synthetic` follows `paths.cache_dir`), and `???` marks a
key that must be given. A row without a default is a mapping whose keys follow it. Comments
that cite "FNE_SPEC section n" refer to [the specification](../concepts/specification.md); those
that cite "docs: <page>" to a page of this site.
"""


def render(conf_dir: Path | str | None = None) -> str:
    """The reference page for the configs under ``conf_dir`` (default: the repository's ``conf/``)."""
    conf = Path(conf_dir) if conf_dir is not None else CONF_DIR
    configs = [scan(path, conf) for path in sorted(conf.rglob("*.yaml"))]
    placed = packages(configs)
    out = [INTRO, "## Entry points", ""]
    primary = {c.option: c for c in configs if not c.group}
    for name in [*[p for p in PRIMARY if p in primary], *sorted(set(primary) - set(PRIMARY))]:
        use = f"The primary config of `python -m {ENTRY_MODULES[name]}`." if name in ENTRY_MODULES else "A primary config."
        out += [f"### {name}", "", use, ""]
        out += _section(primary[name], "")
    groups = sorted({c.group for c in configs if c.group})
    for group in groups:
        package = placed.get(group, group.replace("/", "."))
        out += [f"## {group}", ""]
        for config in sorted((c for c in configs if c.group == group), key=lambda c: c.option):
            out += [f"### {group}={config.option}", ""]
            out += _section(config, "" if config.package == "_global_" else package)
    return "\n".join(out).rstrip("\n") + "\n"


def undocumented(conf_dir: Path | str | None = None) -> list[str]:
    """``conf/<file>: <key>`` for every key that has no comment."""
    conf = Path(conf_dir) if conf_dir is not None else CONF_DIR
    return [f"conf/{c.rel}: {k.path}" for c in (scan(p, conf) for p in sorted(conf.rglob("*.yaml")))
            for k in c.keys if not k.comment]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page, or with ``--check`` only compare it with a fresh generation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when {OUTPUT_NAME} differs from a fresh generation; write nothing")
    args = parser.parse_args(argv)
    page = render()
    missing = undocumented()
    if missing:  # the page is still written; the test suite is what refuses it
        print("keys without a comment:\n  " + "\n  ".join(missing), file=sys.stderr)
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else None
        if current != page:
            print(f"{OUTPUT_NAME} is out of date with conf/: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(page, encoding="utf-8")
    print(f"wrote {OUTPUT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
