"""The commands written in the documentation, and a check of each against the real configs.

:func:`collect` reads the fenced shell blocks (``bash``, ``sh``, ``shell``, ``console``; MyST's
``{code-block} bash`` too) of Markdown files and returns every command in them that runs an entry
point: ``python -m fne_lightning.<entry>`` (any ``python``/``.venv/bin/python``, after ``srun``,
``env``, ``time`` or environment assignments such as ``HF_HUB_OFFLINE=1``), the console scripts
``fne-<entry>`` of ``pyproject.toml`` and ``make train [ARGS="..."]``. Backslash-continued lines are
joined, a quoted string may span lines, ``# comments`` are dropped (shlex), and in a block with
``$ `` prompts only the prompted lines (and their continuations) are commands, the rest is output.

A block preceded directly (the line before its opening fence) by ``<!-- docs-test: fails -->`` is
meant to fail: each of its commands must fail the check.

:func:`check_command` composes a command the way its entry point would run it, without running
it: see ``tests/test_documented_commands.py``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "shell-session", "zsh"}
FAILS_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*fails\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")

# python -m fne_lightning.<module> -> entry; console script -> entry (pyproject.toml [project.scripts]).
ENTRIES = ("train", "evaluate", "export", "make_shards", "convert_positives")
HYDRA_ENTRIES = {"train": "train", "evaluate": "evaluate", "export": "export", "make_shards": "make_shards"}
SCRIPTS = {"fne-train": "train", "fne-evaluate": "evaluate", "fne-export": "export",
           "fne-make-shards": "make_shards", "fne-convert-positives": "convert_positives"}
# Commands that run the command after them (their own options are skipped).
WRAPPERS = {"srun", "env", "time", "nohup", "exec", "command"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTION = re.compile(r"^\d*(>>?|<|>&|&>)(.*)$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
PYTHON_FLAGS_WITH_VALUE = {"-X", "-W", "-Q"}
# <name> with no space inside its brackets' edges (so "< in.txt > out" stays a redirection).
PLACEHOLDER = re.compile(r"<([^\s<>=]|[^\s<>=][^<>=\n]*[^\s<>=])>")


@dataclass(frozen=True)
class DocCommand:
    """One documented command that runs an entry point."""

    path: str  # as shown in ids: README.md, docs/guides/training.md
    line: int  # 1-based line of the command's first line
    text: str  # the command as written (continuations joined)
    entry: str  # train, evaluate, export, make_shards, convert_positives; "" for an unknown module
    args: tuple[str, ...]  # the entry point's own arguments (sys.argv[1:])
    expect_failure: bool = False
    problem: str = ""  # why the command cannot run at all (an unknown fne_lightning module)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


class CommandFailed(Exception):
    """A documented command that its entry point would refuse."""


# ----------------------------------------------------------------------------------------------
# Collecting


@dataclass
class _Block:
    language: str
    lines: list[tuple[int, str]]  # (1-based line number, text)
    expect_failure: bool


def _language(info: str) -> str:
    words = info.strip().split()
    if not words:
        return ""
    if words[0] in ("{code-block}", "{code}", "{sourcecode}") and len(words) > 1:
        return words[1].lower()
    return words[0].strip("{}").lower()


def code_blocks(text: str) -> Iterator[_Block]:
    """The fenced code blocks of a Markdown text (CommonMark fences: a closing fence is the same
    character, at least as long, so a block may show shorter fences inside it)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"].expandtabs())
        expect_failure = i > 0 and bool(FAILS_MARKER.match(lines[i - 1]))
        body: list[tuple[int, str]] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence)
                    and not closing["info"].strip()):
                break
            line = lines[j].expandtabs()
            strip = min(indent, len(line) - len(line.lstrip(" ")))
            body.append((j + 1, line[strip:]))
            j += 1
        language = _language(opening["info"])
        if opening["info"].strip().startswith("{"):  # MyST directive options (:caption: ...)
            while body and body[0][1].startswith(":"):
                body.pop(0)
        yield _Block(language, body, expect_failure)
        i = j + 1


def _without_comments(text: str) -> str:
    """``text`` without its ``# comments``: as in a shell, a ``#`` that starts a word (not one
    inside a word such as ``a#b``, nor a quoted one) to the end of its line."""
    out, quote, i = [], None, 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                out.append(char)
                i += 1
                char = text[i] if i < len(text) else ""
        elif char == "\\":
            out.append(char)
            i += 1
            char = text[i] if i < len(text) else ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            end = text.find("\n", i)
            if end < 0:
                break
            i, char = end, "\n"
        out.append(char)
        i += 1
    return "".join(out)


def logical_lines(lines: Sequence[tuple[int, str]]) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, text, shell words) of each command of a shell block: backslash continuations
    joined, quoted strings across lines kept together, ``# comments`` dropped; with ``$ `` prompts
    only the prompted lines count."""
    prompted = any(text.lstrip().startswith("$ ") or text.strip() == "$" for _, text in lines)
    i = 0
    while i < len(lines):
        number, text = lines[i]
        i += 1
        if prompted:
            stripped = text.lstrip()
            if not (stripped.startswith("$ ") or stripped == "$"):
                continue
            text = stripped[2:]
        while True:
            code = _without_comments(text).rstrip()
            if (len(code) - len(code.rstrip("\\"))) % 2 and i < len(lines):  # a backslash continuation
                following = lines[i][1].strip()
                if prompted and following.startswith("> "):  # the shell's continuation prompt
                    following = following[2:]
                text = code[:-1] + " " + following
                i += 1
                continue
            try:
                words = shlex.split(unplaceholder(code))
            except ValueError:  # an open quote: the string goes on on the next line
                if i < len(lines):
                    text += "\n" + lines[i][1]
                    i += 1
                    continue
                words = []
            text = code
            break
        if words:
            yield number, " ".join(text.split()), words


def unplaceholder(text: str) -> str:
    """``<run>`` -> ``run``, ``<run dir>`` -> ``run_dir``: placeholders for the reader to fill in.
    Written as they are, neither the shell (a redirection) nor Hydra's override grammar accepts
    them, so the check uses their names."""
    return PLACEHOLDER.sub(lambda m: re.sub(r"\W+", "_", m[1]).strip("_") or "x", text)


def _segments(words: list[str]) -> Iterator[list[str]]:
    """Simple commands of a command line (split at && || ; | &), redirections removed."""
    current: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word in SEPARATORS:
            if current:
                yield current
            current = []
            continue
        redirect = REDIRECTION.match(word)
        if redirect:
            skip_next = not redirect[2]  # "> file": the file is the next word
            continue
        current.append(word)
    if current:
        yield current


def entry_invocation(words: list[str]) -> tuple[str, list[str], str] | None:
    """(entry, arguments, problem) when ``words`` (one simple command) runs an entry point."""
    i = 0
    while i < len(words) and ASSIGNMENT.match(words[i]):
        i += 1
    if i < len(words) and os.path.basename(words[i]) in WRAPPERS:
        i += 1
        while i < len(words) and not _program(words[i]):
            i += 1
    if i >= len(words):
        return None
    program, rest = os.path.basename(words[i]), words[i + 1:]
    if program in SCRIPTS:
        return SCRIPTS[program], rest, ""
    if program.startswith("fne-"):
        return "", rest, f"{program}: not a console script of pyproject.toml ({', '.join(SCRIPTS)})"
    if program == "make":
        return _make_train(rest)
    if PYTHON.match(program):
        return _python_module(rest)
    return None


def _program(word: str) -> bool:
    name = os.path.basename(word)
    return bool(PYTHON.match(name)) or name in SCRIPTS or name.startswith("fne-") or name == "make"


def _python_module(rest: list[str]) -> tuple[str, list[str], str] | None:
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "-m" and i + 1 < len(rest):
            module, args = rest[i + 1], rest[i + 2:]
            break
        if word.startswith("-m") and len(word) > 2:
            module, args = word[2:], rest[i + 1:]
            break
        if not word.startswith("-") or word == "-c":
            return None  # a script or -c code
        i += 2 if word in PYTHON_FLAGS_WITH_VALUE else 1
    else:
        return None
    if not (module == "fne_lightning" or module.startswith("fne_lightning.")):
        return None
    entry = module.removeprefix("fne_lightning.")
    if entry in ENTRIES:
        return entry, args, ""
    if importlib.util.find_spec(module) is None:
        return "", args, f"python -m {module}: no such module (entry points: fne_lightning.{{{','.join(ENTRIES)}}})"
    return None  # a module of the package that is not an entry point


def _make_train(rest: list[str]) -> tuple[str, list[str], str] | None:
    targets, variables = [], {}
    i = 0
    while i < len(rest):
        word = rest[i]
        if word in ("-C", "-f", "-j", "-I", "-o", "-W") and i + 1 < len(rest):
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        if ASSIGNMENT.match(word):
            name, value = word.split("=", 1)
            variables[name] = value
        else:
            targets.append(word)
        i += 1
    if "train" not in targets:
        return None
    # The recipe runs `python -m fne_lightning.train $(ARGS)`: the shell splits ARGS again.
    return "train", shlex.split(variables.get("ARGS", ""), comments=True), ""


def commands_in_markdown(text: str, path: str) -> list[DocCommand]:
    """The entry-point commands of one Markdown text (``path`` names it in the results)."""
    found = []
    for block in code_blocks(text):
        if block.language not in SHELL_LANGUAGES:
            continue
        for number, line, words in logical_lines(block.lines):
            for segment in _segments(words):
                hit = entry_invocation(segment)
                if hit is None:
                    continue
                entry, args, problem = hit
                found.append(DocCommand(path, number, line, entry, tuple(args), block.expect_failure, problem))
    return found


def documentation_files(root: Path) -> list[Path]:
    """``README.md`` and every ``docs/**/*.md`` (not the built site in ``docs/_build``)."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    docs = root / "docs"
    if docs.is_dir():
        files += sorted(p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts)
    return files


def collect(paths: Iterable[Path], root: Path | None = None) -> list[DocCommand]:
    """The entry-point commands of the Markdown files ``paths`` (named relative to ``root``)."""
    found = []
    for path in paths:
        path = Path(path)
        try:
            name = path.resolve().relative_to(root.resolve()).as_posix() if root else str(path)
        except ValueError:
            name = str(path)
        found += commands_in_markdown(path.read_text(encoding="utf-8"), name)
    return found


def case_ids(commands: Sequence[DocCommand]) -> list[str]:
    """``file:line`` of each command; a second command on the same line gets ``#2``."""
    seen: dict[str, int] = {}
    ids = []
    for cmd in commands:
        seen[cmd.where] = seen.get(cmd.where, 0) + 1
        ids.append(cmd.where if seen[cmd.where] == 1 else f"{cmd.where}#{seen[cmd.where]}")
    return ids


# ----------------------------------------------------------------------------------------------
# Checking


def check_command(cmd: DocCommand, tmp_path: Path) -> str:
    """Check ``cmd`` as its entry point would read it; raises :class:`CommandFailed` (naming the
    command and the reason) where the entry point would refuse it. Returns what was checked.

    Hydra entry points need a Hydra context on the config directory
    (``hydra.initialize_config_dir(config_dir())``, e.g. :func:`hydra_context`)."""
    try:
        if cmd.problem:
            raise CommandFailed(cmd.problem)
        if cmd.entry == "convert_positives":
            return _check_convert_positives(list(cmd.args))
        return _check_hydra(cmd.entry, list(cmd.args), tmp_path)
    except Exception as err:  # noqa: BLE001 -- every refusal is reported with the command
        reason = _describe(err)
        first, _, rest = reason.partition("\n")
        details = "".join(f"\n  {line}" for line in rest.splitlines())
        raise CommandFailed(f"{cmd.where}: {first}\n  $ {cmd.text}{details}") from err


def _describe(err: BaseException) -> str:
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip()
        if text and all(text not in p for p in parts):
            parts.append(text if isinstance(err, CommandFailed) else f"{type(err).__name__}: {text}")
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return "\n".join(parts)


@contextlib.contextmanager
def _argparse_output() -> Iterator[io.StringIO]:
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        yield out


def _check_convert_positives(args: list[str]) -> str:
    from fne_lightning.convert_positives import parse_args

    with _argparse_output() as out:
        try:
            parse_args(args)
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise CommandFailed(f"argparse refused the arguments: {out.getvalue().strip()}") from None
    return "argparse"


# Compositions are cached per (config, overrides): the same command written twice composes once.
_COMPOSED: dict[tuple[str, tuple[str, ...]], Any] = {}


@contextlib.contextmanager
def hydra_context() -> Iterator[None]:
    """One Hydra context on ``conf/`` for many checks (all entry points' configs live there)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # the caller's context
        yield
        return
    from fne_lightning.utils.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="docs_test"):
        _COMPOSED.clear()
        try:
            yield
        finally:
            _COMPOSED.clear()


def _compose(config_name: str, overrides: list[str]) -> Any:
    from hydra import compose

    key = (config_name, tuple(overrides))
    if key not in _COMPOSED:
        try:
            _COMPOSED[key] = compose(config_name, overrides, return_hydra_config=True)
        except Exception as err:  # noqa: BLE001 -- cached too: the same refusal the next time
            _COMPOSED[key] = err
    result = _COMPOSED[key]
    if isinstance(result, Exception):
        raise result
    return copy.deepcopy(result)


def stand_in_run_dir(tmp_path: Path) -> Path:
    """A directory that ``resume_args`` accepts: ``checkpoints/last.ckpt`` and the run's
    ``.hydra/overrides.yaml`` (no overrides)."""
    from fne_lightning.utils.resume import LAST

    run_dir = tmp_path / "stand_in_run"
    (run_dir / LAST).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / LAST).touch()
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    return run_dir


def _with_stand_in_runs(args: list[str], tmp_path: Path) -> list[str]:
    """``resume=<dir>`` of a run that is not here (``outputs/train/<run>``) -> a stand-in run dir."""
    from fne_lightning.utils.resume import LAST, _key

    out = []
    for arg in args:
        if _key(arg) == "resume" and "=" in arg:
            prefix, value = arg.split("=", 1)
            if value not in ("null", "None", "") and not (Path(os.path.expanduser(value)) / LAST).is_file():
                arg = f"{prefix}={stand_in_run_dir(tmp_path)}"
        out.append(arg)
    return out


def _check_hydra(entry: str, args: list[str], tmp_path: Path) -> str:
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    config_name = HYDRA_ENTRIES[entry]
    if entry == "train":  # train.main rewrites its command line before Hydra reads it
        from fne_lightning.train import normalize_experiment_args
        from fne_lightning.utils.resume import resume_args

        args = resume_args(normalize_experiment_args(_with_stand_in_runs(args, tmp_path)))

    with _argparse_output() as out:
        try:
            ns = get_args_parser().parse_args(args)
        except SystemExit as stop:
            if stop.code in (0, None):  # --version
                return "version"
            raise CommandFailed(f"Hydra's command line refused {args}: {out.getvalue().strip()}") from None
    # As hydra._internal.utils._run_hydra reads the parsed flags.
    if ns.help or ns.hydra_help:
        return "help"
    if ns.config_path is not None or ns.config_dir is not None:
        raise CommandFailed("--config-path / --config-dir: another config directory is not checked here")
    config_name = ns.config_name or config_name
    show_cfg = ns.cfg is not None
    if ns.resolve and not show_cfg:
        raise CommandFailed("The --resolve flag can only be used in conjunction with --cfg or --help")
    if ns.run + show_cfg + ns.multirun + ns.shell_completion + (ns.info is not None) > 1:
        raise CommandFailed("Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified")
    if ns.shell_completion:
        return "shell completion"
    overrides = list(ns.overrides)
    if ns.info is not None:  # Hydra's show_info composes in run mode (and reconfigures logging: not called)
        _compose(config_name, overrides)
        return "--info"
    if show_cfg:
        _show_cfg(entry, config_name, overrides, ns)
        return "--cfg"

    parsed = _parse_overrides(overrides)
    if not ns.multirun:
        if any(o.is_sweep_override() for o in parsed):
            mode = GlobalHydra.instance().hydra.get_mode(config_name=config_name, overrides=overrides)
            if mode != RunMode.MULTIRUN:
                _compose(config_name, overrides)  # raises Hydra's own error for a sweep without --multirun
                raise CommandFailed("sweep overrides need --multirun")
        else:
            cfg = _compose(config_name, overrides)
            if cfg.hydra.mode != RunMode.MULTIRUN:  # else the config asks for a sweep (hparams_search=...)
                _validate_job(entry, cfg, RunMode.RUN, 0)
                return "run"
    points = _sweep_points(config_name, parsed)
    for number, point in enumerate(points):
        _validate_job(entry, _compose(config_name, point), RunMode.MULTIRUN, number)
    return f"multirun ({len(points)} compositions)"


def _show_cfg(entry: str, config_name: str, overrides: list[str], ns: Any) -> None:
    """Hydra's own ``--cfg`` (``show_cfg``: compose, select, resolve with ``--resolve``), output
    dropped, with the resolvers the entry point has."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    previous = HydraConfig.instance().cfg
    try:
        with _only_resolvers(entry_resolvers()[entry]), _argparse_output() as out:
            try:
                GlobalHydra.instance().hydra.show_cfg(config_name=config_name, overrides=overrides, cfg_type=ns.cfg,
                                                      package=ns.package, resolve=ns.resolve)
            except SystemExit as stop:
                if stop.code not in (0, None):
                    raise CommandFailed(out.getvalue().strip()[-2000:]) from None
    finally:
        HydraConfig.instance().cfg = previous


def _parse_overrides(overrides: list[str]) -> list[Any]:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().hydra.config_loader
    return OverridesParser.create(config_loader=loader).parse_overrides(overrides=overrides)


def _sweep_values(override: Any) -> list[str]:
    """Every value a sweep override takes (an interval: its two ends)."""
    if override.is_discrete_sweep():
        return [str(v) for v in override.sweep_string_iterator()]
    if override.is_interval_sweep():
        value = override.value()
        return [str(value.start), str(value.end)]
    raise CommandFailed(f"{override.input_line}: a sweep this check cannot enumerate")


def _sweep_points(config_name: str, parsed: list[Any]) -> list[list[str]]:
    """Override lists that between them give every swept key each of its values (point i takes
    value i of each key, or its last): not the cartesian product. Sweeps of the sweeper's config
    (``hydra.sweeper.params``, e.g. an hparams_search) count as swept keys too."""
    from hydra.errors import ConfigCompositionException

    for override in parsed:
        if override.is_sweep_override() and override.is_hydra_override():
            raise ConfigCompositionException(f"Sweeping over Hydra's configuration is not supported : "
                                             f"'{override.input_line}'")

    def points(sweeps: list[tuple[int, str, list[str]]], fixed: list[tuple[int, str]]) -> list[list[str]]:
        count = max([len(values) for _, _, values in sweeps], default=1)
        out = []
        for i in range(count):
            chosen = fixed + [(pos, f"{key}={values[min(i, len(values) - 1)]}") for pos, key, values in sweeps]
            out.append([text for _, text in sorted(chosen, key=lambda item: item[0])])
        return out

    sweeps = [(n, o.get_key_element(), _sweep_values(o)) for n, o in enumerate(parsed) if o.is_sweep_override()]
    fixed = [(n, o.input_line) for n, o in enumerate(parsed) if not o.is_sweep_override()]
    first = points(sweeps, fixed)
    params = _compose(config_name, first[0]).hydra.get("sweeper", {}).get("params") or {}
    given = {o.get_key_element().lstrip("+~") for o in parsed}
    extra = [f"{k}={v}" for k, v in params.items() if str(k) not in given]
    if not extra:
        return first
    # The sweeper's own parameters come first (as BasicSweeper puts them), the command line after.
    from_config = _parse_overrides(extra)
    sweeps = [(n - len(from_config), o.get_key_element(), _sweep_values(o) if o.is_sweep_override()
               else [o.get_value_element_as_str()]) for n, o in enumerate(from_config)] + sweeps
    return points(sweeps, fixed)


# In a fresh interpreter: the OmegaConf resolvers there are once Hydra has set up and each entry
# point's module is imported (what a config may use before the entry point's own code runs).
_RESOLVER_PROBE = """
import json, sys
from hydra.core.utils import setup_globals
from omegaconf.basecontainer import BaseContainer
setup_globals()
base = dict(BaseContainer._resolvers)
found = {}
for entry in sys.argv[1:]:
    for name in [m for m in sys.modules if m.split(".")[0] == "fne_lightning"]:
        del sys.modules[name]
    BaseContainer._resolvers.clear()
    BaseContainer._resolvers.update(base)
    __import__("fne_lightning." + entry)
    found[entry] = sorted(BaseContainer._resolvers)
print(json.dumps(found))
"""


@functools.lru_cache(maxsize=1)
def entry_resolvers() -> dict[str, frozenset[str]]:
    """The resolvers each Hydra entry point has when Hydra composes its config: one interpreter
    for all of them (not one per command), since this one has imported every entry point."""
    done = subprocess.run([sys.executable, "-c", _RESOLVER_PROBE, *HYDRA_ENTRIES], capture_output=True,
                          text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"importing the entry points failed:\n{done.stderr[-3000:]}")
    return {entry: frozenset(names) for entry, names in json.loads(done.stdout.splitlines()[-1]).items()}


@contextlib.contextmanager
def _only_resolvers(names: frozenset[str]) -> Iterator[None]:
    from omegaconf.basecontainer import BaseContainer

    hidden = {k: v for k, v in BaseContainer._resolvers.items() if k not in names}
    for name in hidden:
        del BaseContainer._resolvers[name]
    try:
        yield
    finally:
        BaseContainer._resolvers.update(hidden)


@contextlib.contextmanager
def _as_hydra_config(cfg: Any, mode: Any, job_number: int, entry: str) -> Iterator[Any]:
    """``cfg`` as the current Hydra config, with what Hydra sets when a job starts (mode, job
    number, output directory) and every interpolation resolved, with the resolvers the entry point
    has by then; the previous Hydra config afterwards."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    previous = HydraConfig.instance().cfg
    try:
        with _only_resolvers(entry_resolvers()[entry]):
            with open_dict(cfg):
                cfg.hydra.mode = mode
                cfg.hydra.job.num = job_number
                sweep = cfg.hydra.sweep
                cfg.hydra.runtime.output_dir = (str(cfg.hydra.run.dir) if mode == RunMode.RUN
                                                else f"{sweep.dir}/{sweep.subdir}")
            HydraConfig.instance().set_config(cfg)
            OmegaConf.to_container(cfg, resolve=True)
        yield cfg
    finally:
        HydraConfig.instance().cfg = previous


def _validate_job(entry: str, cfg: Any, mode: Any, job_number: int) -> None:
    """What the entry point checks before it builds anything (train: the recipe for the data, a
    local sweep of DDP runs, the run directory of ``resume=``), with ``cfg`` as Hydra's config."""
    with _as_hydra_config(cfg, mode, job_number, entry):
        if entry == "train":
            from fne_lightning.train import check_launch, check_recipe
            from fne_lightning.utils.resume import plan_resume

            check_recipe()
            check_launch(cfg)
            plan_resume(cfg)
