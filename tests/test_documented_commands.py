"""Every documented command still works against the real configs.

The commands are those of the fenced shell blocks (``bash``, ``sh``, ``shell``, ``console``) of
``README.md`` and ``docs/**/*.md`` (not ``docs/_build/``) that run an entry point:
``python -m fne_lightning.<entry>`` (also ``.venv/bin/python``, ``srun python``, with environment
assignments such as ``HF_HUB_OFFLINE=1`` in front), the console scripts ``fne-train``,
``fne-evaluate``, ``fne-export``, ``fne-make-shards``, ``fne-convert-positives``, and
``make train [ARGS="..."]``. Other lines (``wandb sync``, ``pip``, ``make test``, ``#SBATCH``) are
ignored. One test case per command, named ``<file>:<line>`` (the command's first line).

Each command is checked the way its entry point reads its command line, without running it:

* Hydra entry points (train, evaluate, export, make_shards): what the entry point does before
  Hydra (train: ``normalize_experiment_args`` then ``resume_args``; a ``resume=<dir>`` that is not
  here becomes a stand-in run directory), Hydra's own argument parser (``-m``, ``--cfg``,
  ``--info``, ``--help``; ``--help`` checks nothing more), then composition of ``conf/`` with
  every override, ``hydra.*`` and ``hydra/launcher=...`` included, and resolution of every
  interpolation with only the resolvers the entry point has registered when Hydra composes (its
  module's imports; found once, in one fresh interpreter). ``--cfg`` runs Hydra's own
  ``show_cfg``. A sweep (``-m``, or a config that asks for one such as ``hparams_search=...``,
  whose ``hydra.sweeper.params`` count as sweeps) composes once per value of each swept key, not
  the cartesian product. Train then runs its checks that need no model or data: the recipe for
  the data (``data=f30k`` without ``experiment=`` is refused), a local sweep of DDP runs, the run
  directory of ``resume=``.
* ``convert_positives`` (argparse): its parser parses the arguments (an unknown option fails).

Placeholders (``DIR``, ``FILE``, ``...``, ``/data/flickr30k``) are strings to Hydra and compose as
they are; ``<run>`` (which neither the shell nor Hydra's override grammar accepts) is checked as
``run``.

A block whose commands are meant to fail (e.g. to show an error) is marked by an HTML comment on
the line directly before its opening fence::

    <!-- docs-test: fails -->
    ```bash
    python -m fne_lightning.train data=f30k    # refused: no experiment= for real data
    ```

Each command of such a block must fail the check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_commands import (
    CommandFailed,
    DocCommand,
    case_ids,
    check_command,
    collect,
    commands_in_markdown,
    documentation_files,
    hydra_context,
)

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = collect(documentation_files(ROOT), ROOT)


@pytest.fixture(scope="module")
def hydra_conf():
    """One Hydra context on conf/ for every case of this module."""
    with hydra_context():
        yield


@pytest.mark.parametrize("cmd", COMMANDS, ids=case_ids(COMMANDS))
def test_documented_command(cmd: DocCommand, hydra_conf: None, tmp_path: Path) -> None:
    try:
        check_command(cmd, tmp_path)
        refusal = None
    except CommandFailed as refused:
        refusal = str(refused)
    if refusal is not None and not cmd.expect_failure:
        pytest.fail(refusal, pytrace=False)  # names the file, line, command and reason
    if refusal is None and cmd.expect_failure:
        pytest.fail(f"{cmd.where}: in a block marked <!-- docs-test: fails -->, but passes the check\n"
                    f"  $ {cmd.text}", pytrace=False)
    assert refusal is None or refusal.strip()


def test_commands_found_in_readme_and_docs() -> None:
    """The collector found commands in both places, so this file cannot pass on nothing."""
    places = {c.path.split("/")[0] for c in COMMANDS}
    assert "README.md" in places, "no entry-point command found in README.md"
    assert "docs" in places, "no entry-point command found in docs/**/*.md"


MARKDOWN = """\
Text with `python -m fne_lightning.train inline=1`, not a block.

```bash
python -m fne_lightning.train loss=vsepp \\
    trainer.max_epochs=2        # a comment
HF_HUB_OFFLINE=1 .venv/bin/python -m fne_lightning.evaluate model=tiny data=f30k
srun python -u -m fne_lightning.train trainer=ddp
make train ARGS="loss=vsepp 'logger=[csv,wandb]'"
make train   # the default experiment
make test ARGS="-x"
wandb sync outputs/train/run/wandb/offline-run-1
pip install -e .
fne-make-shards data=coco out_dir=/tmp/x && fne-convert-positives --karpathy a.json
python -m fne_lightning.train 'data.train_shards="/x/{0..3}.tar"' tag=a#b
fne-evaluate ckpt_path=outputs/train/<run dir>/best.ckpt > out.txt 2>&1
```

```python
python -m fne_lightning.train ignored=1
```

<!-- docs-test: fails -->
```console
$ python -m fne_lightning.train data=f30k \\
>   data.root=/data
$ fne-train loss.nope=1
Error executing job: python -m fne_lightning.train output=1
```

````markdown
```bash
python -m fne_lightning.train inside_another_block=1
```
````

~~~sh
python -m fne_lightning.export ckpt_path=x out_dir=y
~~~
"""


def test_parser_reads_markdown() -> None:
    found = commands_in_markdown(MARKDOWN, "page.md")
    got = [(c.line, c.entry, list(c.args), c.expect_failure) for c in found]
    assert got == [
        (4, "train", ["loss=vsepp", "trainer.max_epochs=2"], False),
        (6, "evaluate", ["model=tiny", "data=f30k"], False),
        (7, "train", ["trainer=ddp"], False),
        (8, "train", ["loss=vsepp", "logger=[csv,wandb]"], False),
        (9, "train", [], False),
        (13, "make_shards", ["data=coco", "out_dir=/tmp/x"], False),
        (13, "convert_positives", ["--karpathy", "a.json"], False),
        (14, "train", ['data.train_shards="/x/{0..3}.tar"', "tag=a#b"], False),
        (15, "evaluate", ["ckpt_path=outputs/train/run_dir/best.ckpt"], False),
        (24, "train", ["data=f30k", "data.root=/data"], True),
        (26, "train", ["loss.nope=1"], True),
        (37, "export", ["ckpt_path=x", "out_dir=y"], False),
    ]
    assert found[0].text == "python -m fne_lightning.train loss=vsepp trainer.max_epochs=2"
    assert case_ids(found)[5:7] == ["page.md:13", "page.md:13#2"]


def test_unknown_module_or_script_fails(tmp_path: Path) -> None:
    found = commands_in_markdown("```bash\npython -m fne_lightning.trian\nfne-trian x=1\n```\n", "p.md")
    assert [c.entry for c in found] == ["", ""]
    for cmd in found:
        with pytest.raises(CommandFailed, match="p.md:"):
            check_command(cmd, tmp_path)


CHECKED = """\
```bash
python -m fne_lightning.train loss.cutdown=0.3 trainer.max_epochs=2
make train ARGS="loss=vsepp 'logger=[csv,wandb]'"
python -m fne_lightning.train resume=outputs/train/<run> trainer.max_epochs=30
python -m fne_lightning.train -m 'seed=range(0,3)' loss=fne,vsepp
python -m fne_lightning.train --cfg job experiment=f30k_vse
python -m fne_lightning.evaluate --help
fne-convert-positives --karpathy a.json --coco-captions c.json --image-to-caption i.json --out o.json
```

<!-- docs-test: fails -->
```bash
python -m fne_lightning.train loss.cutdwon=0.3
python -m fne_lightning.train loss.cutdown=0.1,0.2
python -m fne_lightning.train -m loss=fne,vsepp,nope
python -m fne_lightning.train data=f30k
python -m fne_lightning.train -m trainer=ddp trainer.devices=2 seed=0,1
python -m fne_lightning.train resume=outputs/train/<run> ckpt_path=last.ckpt
python -m fne_lightning.train --cfg job loss=nope
python -m fne_lightning.make_shards data=coco shards=10
python -m fne_lightning.train --bogus
fne-convert-positives --karpathy a.json --coco-captions c.json --out o.json
```
"""


@pytest.mark.parametrize("cmd", commands_in_markdown(CHECKED, "checked.md"),
                         ids=case_ids(commands_in_markdown(CHECKED, "checked.md")))
def test_check_accepts_and_refuses(cmd: DocCommand, hydra_conf: None, tmp_path: Path) -> None:
    """The check itself, on commands written here: valid ones pass, stale or refused ones fail (a
    missing key, a sweep without -m, a missing option among swept ones, real data without an
    experiment, a local DDP sweep, resume with ckpt_path, unknown options)."""
    if not cmd.expect_failure:
        check_command(cmd, tmp_path)
        return
    with pytest.raises(CommandFailed, match=r"^checked\.md:\d+: "):
        check_command(cmd, tmp_path)
