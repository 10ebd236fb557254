"""Recipes: every loss on every experiment, the behaviour without an experiment, quiet logs."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate

from fne_lightning.losses import FNELoss, InfoNCELoss, SigLIPLoss, VSELoss
from fne_lightning.module import RetrievalModule
from fne_lightning.train import normalize_experiment_args
from fne_lightning.utils.config import config_dir

from conftest import compose_config
from test_train import run_cli

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
LOSSES = {"fne": ["loss=fne"], "vsepp": ["loss=vsepp"], "vse0": ["loss=vse0"],
          "fne_hardest": ["loss=fne", "loss.selection=hardest"], "fne_online_queue": ["loss=fne",
          "loss.queue_features=online"], "infonce": ["loss=infonce"], "infonce_queue_fne": ["loss=infonce",
          "loss.memory_size=256", "loss.false_negatives=fne"], "infonce_distill": ["loss=infonce",
          "loss.false_negatives=distill"], "siglip": ["loss=siglip"]}
# Which losses build momentum encoders: a queue of momentum features, or distillation.
MOMENTUM = {"fne", "fne_hardest", "infonce_queue_fne", "infonce_distill"}


@pytest.fixture(scope="module")
def tiny_encoder():
    cfg = compose_config(["model=tiny"], Path("/nonexistent"))
    return instantiate(cfg.model)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_loss_builds_on_every_experiment(experiment: str, loss: str, tiny_encoder, tmp_path: Path) -> None:
    # model=tiny stands in for towers whose weights are not on this machine; data is built, not read.
    cfg = compose_config([f"experiment={experiment}", *LOSSES[loss], "model=tiny"], tmp_path)
    assert cfg.callbacks.model_checkpoint.monitor == "val/rsum"
    instantiate(cfg.data, shuffle_seed=0)
    loss_module = instantiate(cfg.loss, embed_dim=tiny_encoder.embed_dim)
    kind = {"fne": FNELoss, "infonce": InfoNCELoss, "siglip": SigLIPLoss}.get(loss.split("_")[0], VSELoss)
    assert isinstance(loss_module, kind)
    if loss == "fne_hardest":
        assert loss_module.selection == "hardest"
    module = RetrievalModule(tiny_encoder, loss_module, instantiate(cfg.optim.optimizer),
                             instantiate(cfg.optim.scheduler), seed=int(cfg.seed),
                             scheduler_interval=cfg.optim.get("interval", "epoch"),
                             decay_1d=cfg.optim.get("decay_1d", False))
    # A schedule stepped per optimizer step is given the run's length: a trainer that knows it.
    module.trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in loss_module.parameters() if p.requires_grad} <= trained  # a loss's own temperature
    assert (module.momentum_encoder is not None) == (loss in MOMENTUM)


def test_recipes_set_what_they_promise(tmp_path: Path) -> None:
    paper = compose_config(["experiment=f30k_vse"], tmp_path)
    # The published FNE settings come from loss/fne.yaml, not from the experiment.
    assert (paper.loss.memory_size, paper.momentum, paper.loss.warmup_epochs) == (8224, 0.995, 1)
    assert (paper.optim.optimizer.lr, paper.trainer.max_epochs, paper.data.batch_size) == (2e-5, 25, 32)
    baseline = compose_config(["experiment=f30k_vse", "loss=vsepp"], tmp_path)
    assert baseline.loss._target_.endswith("VSELoss") and "memory_size" not in baseline.loss
    assert baseline.optim.optimizer.lr == 2e-5 and baseline.model.name == paper.model.name
    synthetic = compose_config(["experiment=synthetic"], tmp_path)
    assert (synthetic.loss.memory_size, synthetic.momentum) == (1024, 0.9)  # loss/tuning/synthetic_fne
    assert compose_config(["experiment=synthetic", "loss=vsepp"], tmp_path).loss.warmup_epochs == 10
    clip = compose_config(["experiment=f30k_clip"], tmp_path)  # CLIP_ITM's recipe
    assert clip.loss._target_.endswith("InfoNCELoss") and clip.model.pretrained == "openai"
    assert (clip.optim.optimizer.lr, clip.optim.optimizer.weight_decay, clip.optim.scheduler.warmup_steps,
            clip.optim.interval, clip.data.batch_size, clip.trainer.max_epochs) == (1e-5, 0.2, 500, "step", 256, 5)
    plain = compose_config(["experiment=none"], tmp_path)
    assert (plain.loss.memory_size, plain.optim.optimizer.lr, plain.trainer.max_epochs) == (8224, 2e-5, 25)


def test_deleting_or_nulling_the_experiment_means_none() -> None:
    args = ["~experiment", "experiment=null", "~experiment=synthetic", "experiment=f30k_vse", "loss=vsepp"]
    assert normalize_experiment_args(args) == ["experiment=none"] * 3 + ["experiment=f30k_vse", "loss=vsepp"]


def test_no_experiment_cli(tmp_path: Path) -> None:
    proc = run_cli("data=f30k", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "experiment=f30k_vse" in proc.stderr and proc.stderr.startswith("error: data=f30k:")
    # An explicit experiment is never second-guessed.
    assert run_cli("data=f30k", "experiment=synthetic", "--cfg", "job", cwd=tmp_path).returncode == 0
    none_cfg = run_cli("experiment=none", "--cfg", "job", cwd=tmp_path)
    assert none_cfg.returncode == 0 and "memory_size: 8224" in none_cfg.stdout
    for spelling in ("~experiment", "experiment=null"):
        proc = run_cli(spelling, "--cfg", "job", cwd=tmp_path)
        assert proc.returncode == 0 and proc.stdout == none_cfg.stdout, proc.stderr[-2000:]


LOG_LINE = re.compile(r"^\[[\d\- :,]+\]\[([\w.]+)\]\[(\w+)\] - (.*)$")


def log_messages(output: str) -> list[tuple[str, str]]:
    """(logger, message) of Hydra-formatted log lines, and ('lightning-console', msg) of Lightning's own."""
    out = []
    for line in output.splitlines():
        if m := LOG_LINE.match(line):
            out.append((m.group(1), m.group(3)))
        elif line.startswith("INFO: "):
            out.append(("lightning-console", line.removeprefix("INFO: ")))
    return out


def test_verbose_shows_library_lines_once(tmp_path: Path, cache_dir: Path) -> None:
    # Zero epochs: the set-up's log lines without the cost of training.
    args = ["trainer.max_epochs=0", "test=false", "~logger", "trainer.accelerator=cpu", "figures.enabled=false",
            f"paths.cache_dir={cache_dir}", "data.num_train=32", "data.num_val=8", "data.num_test=8",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli(*args, "verbose=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = log_messages(proc.stdout + proc.stderr)
    assert ("lightning.fabric.utilities.seed", "Seed set to 3407") in messages
    assert any("tokenizer" in msg for name, msg in messages if name == "root")  # open_clip's chatter
    assert not [m for m in messages if m[0] == "lightning-console"]
    texts = [msg for _, msg in messages]
    assert len(texts) == len(set(texts)), [t for t in texts if texts.count(t) > 1]
    quiet = log_messages((proc := run_cli(*args, cwd=tmp_path)).stdout + proc.stderr)
    assert proc.returncode == 0 and quiet
    assert {name.split(".")[0] for name, _ in quiet} == {"fne_lightning"}


@pytest.mark.parametrize("entry", ["train", "evaluate", "export", "make_shards"])
def test_each_entry_point_registers_the_resolvers_its_configs_use(entry: str) -> None:
    """In a fresh interpreter, importing one entry point alone registers every custom resolver the
    configs interpolate (conf/hydra/default.yaml's run directory needs ``run_name``): the test
    process itself has imported all of them, which would hide a missing one."""
    import json
    import subprocess
    import sys

    probe = (f"import json, fne_lightning.{entry}; from omegaconf import OmegaConf; "
             "print(json.dumps([r for r in ('run_name', 'wandb_offline', 'hydra_choice') "
             "if not OmegaConf.has_resolver(r)]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
