"""Training entry point: ``python -m fne_lightning.train [overrides]``.

Composes ``conf/train.yaml`` with Hydra, builds encoder, data, loss and module with
``hydra.utils.instantiate``, trains with Lightning, tests the best checkpoint (by
``val/rsum``) and writes ``metrics.json`` plus a results table into the run directory.
Heavy imports wait until after composition so ``--help``, ``--cfg job`` and bad-input
errors answer quickly.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from fne_lightning.errors import report_user_errors
from fne_lightning.utils.config import config_dir
from fne_lightning.utils.resume import resume_args

log = logging.getLogger(__name__)


# The paper's recipe for each real dataset: what `data=<name>` without an experiment should use.
PAPER_EXPERIMENTS = {"f30k": "f30k_vse", "coco": "coco_vse"}


def normalize_experiment_args(args: list[str]) -> list[str]:
    """``~experiment`` and ``experiment=null`` mean ``experiment=none`` (the base recipe).

    Hydra cannot delete or null this group: the defaults list interpolates ``${experiment}``
    to find the per-experiment loss settings, so both would end in an interpolation error.
    """
    return ["experiment=none" if re.fullmatch(r"~experiment(=.*)?|experiment=null", a) else a for a in args]


def check_recipe() -> None:
    """Refuse the synthetic default recipe on real data unless ``experiment=`` was chosen.

    ``experiment=synthetic`` is the default so that ``make train`` needs no arguments; its
    recipe (random init, VSE0 warm-up, lr 5e-4, a 1,024-slot bank) is wrong for Flickr30K or
    COCO, and ``data=f30k`` alone must not run it silently.
    """
    from hydra.core.hydra_config import HydraConfig

    from fne_lightning.errors import FNEError

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    experiment, data = hc.runtime.choices.get("experiment"), hc.runtime.choices.get("data")
    explicit = any(o.lstrip("+~").split("=", 1)[0] == "experiment" for o in hc.overrides.task)
    if explicit or experiment != "synthetic" or data == "synthetic":
        return
    paper = PAPER_EXPERIMENTS.get(str(data))
    use = f"experiment={paper} (the paper's recipe for this data)" if paper else \
        "an experiment written for this data (conf/experiment/<name>.yaml)"
    raise FNEError(f"data={data}: the default experiment=synthetic is the CPU recipe of the synthetic benchmark "
                   f"(random init, VSE0 warm-up, lr 5e-4), not one for real data; use {use}, or experiment=none "
                   "for the base recipe, or experiment=synthetic to run it anyway")


def check_launch(cfg: DictConfig) -> None:
    """Refuse a local multirun sweep of multi-process DDP runs, before any process starts.

    Lightning's DDP launcher starts the other ranks by re-running this command line, and a
    Hydra multirun command line is the whole sweep: every child rank would start a sweep of
    its own. One job per SLURM allocation (``hydra/launcher=slurm``) has no such problem.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fne_lightning.errors import FNEError

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    processes = (devices if isinstance(devices, int) else len(devices) if not isinstance(devices, str)
                 else 2 if devices == "-1" else 1)
    ddp = str(trainer.get("strategy", "")).startswith("ddp") and (processes * int(trainer.get("num_nodes", 1)) > 1)
    launcher = str(hc.runtime.choices.get("hydra/launcher", "basic"))
    if hc.mode == RunMode.MULTIRUN and ddp and launcher == "basic":
        raise FNEError(f"trainer.strategy={trainer.get('strategy')!r}: a local multirun sweep (-m or hparams_search) "
                       "cannot launch DDP runs (each rank Lightning starts would re-run the whole sweep); sweep "
                       "with hydra/launcher=slurm (one job per sweep point), or run the points one at a time")


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate (module, datamodule) from a composed config."""
    from hydra.utils import instantiate

    from fne_lightning.module import RetrievalModule

    datamodule = instantiate(cfg.data, shuffle_seed=int(cfg.seed))
    datamodule.load_all()  # missing or broken data fails before a large model is built
    encoder = instantiate(cfg.model)
    datamodule.use_encoder(encoder.image_config, encoder.tokenizer)
    loss = instantiate(cfg.loss, embed_dim=encoder.embed_dim)
    optim = cfg.optim
    module = RetrievalModule(
        encoder=encoder,
        loss=loss,
        optimizer=instantiate(optim.optimizer),
        scheduler=instantiate(optim.scheduler) if optim.get("scheduler") else None,
        config=OmegaConf.to_container(cfg, resolve=True),
        seed=int(cfg.seed),
        momentum=float(cfg.momentum),
        nonfinite=cfg.get("nonfinite", "stop"),
        scheduler_interval=optim.get("interval", "epoch"),
        decay_1d=optim.get("decay_1d", False),
    )
    return module, datamodule


def check_resume(cfg: DictConfig, module: Any, path: Path | None) -> dict[str, Any] | None:
    """The checkpoint ``path`` to resume from, after checking it loads safely and fits the configured
    model (None: a fresh run)."""
    from fne_lightning.utils.checkpoints import checkpoint_mismatch, load_checkpoint, state_mismatch

    if path is None:
        return None
    key = "ckpt_path" if cfg.get("ckpt_path") else "resume"
    ckpt = load_checkpoint(path, bool(cfg.get("trust_checkpoint", False)), key=key)
    problem = state_mismatch(module.state_dict(), ckpt["state_dict"])
    if problem:
        trained = (ckpt.get("hyper_parameters") or {}).get("model") or {}
        raise checkpoint_mismatch(path, trained, OmegaConf.to_container(cfg.model, resolve=True), problem)
    return ckpt


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Callbacks / loggers: every entry of the group that has a ``_target_``."""
    from hydra.utils import instantiate

    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig, callbacks: list[Any] | None = None) -> dict[str, float]:
    """Fit, test, write ``metrics.json``, print the summary; returns the flat metrics.

    ``callbacks``: Lightning callbacks added to the config's (e.g. a benchmark's timers).
    """
    import lightning as L

    from fne_lightning.utils.logs import configure_logging
    from fne_lightning.utils.malloc import configure_malloc
    from fne_lightning.utils.resume import plan_resume

    check_recipe()
    check_launch(cfg)
    configure_logging(verbose_run(cfg))
    configure_malloc(cfg.get("malloc"))
    resume, why = plan_resume(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    module, datamodule = build(cfg)
    ckpt = check_resume(cfg, module, resume)
    if why:
        log.info(why)
    loggers = _loggers(cfg, resume, ckpt)
    try:
        return _fit_and_test(cfg, module, datamodule, loggers, list(callbacks or []), resume)
    finally:
        # A W&B run stays open until finished: the next job of an in-process sweep would reuse it.
        if any(isinstance(lg, L.pytorch.loggers.WandbLogger) for lg in loggers):
            import wandb

            wandb.finish()


def _loggers(cfg: DictConfig, resume: Path | None, ckpt: dict[str, Any] | None) -> list[Any]:
    """The configured loggers; a run resumed in its own directory continues its W&B run (same id)
    and its CSV file (the rows logged before the checkpoint's step are kept)."""
    import lightning as L

    from fne_lightning.utils.resume import read_csv_rows, restore_csv_rows, same_run, wandb_run_id

    group = cfg.get("logger")
    if not same_run(cfg, resume):
        return instantiate_all(group)
    # Continuing in the run's own directory is the point: Lightning's warnings that its checkpoint
    # and log directories are not empty (and that the CSV file will be replaced) do not apply.
    for message in ("Checkpoint directory .* exists and is not empty", "Experiment logs directory .* exists"):
        warnings.filterwarnings("ignore", message=message)
    if not group:
        return []
    run_dir = Path(cfg.paths.output_dir)
    group = group.copy()
    wandb_id = wandb_run_id(run_dir)
    for entry in group.values():
        if isinstance(entry, DictConfig) and str(entry.get("_target_", "")).endswith("WandbLogger") and wandb_id:
            with open_dict(entry):
                entry.id, entry.resume = wandb_id, "allow"
    loggers = instantiate_all(group)
    step = int(ckpt["global_step"]) if ckpt else 0
    for lg in loggers:
        if isinstance(lg, L.pytorch.loggers.CSVLogger):
            header, rows = read_csv_rows(Path(lg.log_dir) / "metrics.csv", before_step=step)
            restore_csv_rows(lg, header, rows)
    return loggers


def _fit_and_test(cfg: DictConfig, module: Any, datamodule: Any, loggers: list[Any],
                  extra_callbacks: list[Any], resume: Path | None) -> dict[str, float]:
    import lightning as L

    from fne_lightning.callbacks import Requeue
    from fne_lightning.utils.report import print_summary, write_json
    from fne_lightning.utils.resume import slurm_plugins

    callbacks = instantiate_all(cfg.get("callbacks")) + extra_callbacks
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": slurm_plugins()}
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 **plugins)

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    out_dir = Path(cfg.paths.output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume,
                    weights_only=not bool(cfg.get("trust_checkpoint", False)))
    except SIGTERMException:
        # The batch in flight finished and last.ckpt is written (callbacks Requeue / LastCheckpoint).
        requeue = next((c for c in callbacks if isinstance(c, Requeue)), None)
        requeued = requeue.requeued if requeue is not None else None
        step = trainer.global_step
        if trainer.is_global_zero:
            if requeued is None:
                print(f"stopped by SIGTERM at step {step}; continue with python -m fne_lightning.train "
                      f"resume={out_dir}", flush=True)
            elif requeued[1]:
                print(f"requeued SLURM job {requeued[0]} at step {step}: it resumes from "
                      f"{out_dir / 'checkpoints' / 'last.ckpt'} when it restarts", flush=True)
            else:
                print(f"stopped at step {step} to requeue SLURM job {requeued[0]}, but scontrol requeue failed; "
                      f"continue with python -m fne_lightning.train resume={out_dir}", flush=True)
        # 143 = 128 + SIGTERM, as a shell reports a terminated job; 0 once requeued; 3 if requeue failed.
        raise SystemExit(143 if requeued is None else 0 if requeued[1] else 3) from None
    metrics: dict[str, float] = {}
    # Last epoch's averages of the training diagnostics (logged per step as fne/<name>), only those
    # the loss reported in that epoch (Lightning keeps a warm-up epoch's keys after they stop).
    last = module.last_epoch_keys
    for key, value in trainer.callback_metrics.items():
        name = key.removesuffix("_epoch")
        if key.startswith(("fne/", "train/")) and key.endswith("_epoch") and (
                not last or name in last or not name.startswith("fne/")):
            metrics[name] = float(value)
    metrics["train/skipped_batches"] = float(module.skipped_batches)  # nonfinite=skip
    ckpt = trainer.checkpoint_callback
    best_path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if ckpt is not None and ckpt.best_model_score is not None:
        metrics[f"{ckpt.monitor}_best"] = float(ckpt.best_model_score)
    if cfg.get("test"):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})

    if trainer.is_global_zero:
        metrics_file = out_dir / "metrics.json"
        write_json(metrics_file, metrics)
        files = {"run directory": out_dir, "best checkpoint": best_path or None, "metrics": metrics_file,
                 "figures": out_dir / "figures" if (out_dir / "figures").is_dir() else None}
        for lg in loggers:
            if isinstance(lg, L.pytorch.loggers.WandbLogger):
                run_dir = Path(lg.experiment.dir).parent  # .../wandb/<offline-run-...>/files
                files["W&B run"] = run_dir
                if lg.experiment.settings.mode in ("offline", "dryrun"):
                    files["W&B upload"] = f"wandb sync {run_dir}"
        print_summary(metrics, files, prefix="test" if "test/rsum" in metrics else None)
    return metrics


def verbose_run(cfg: DictConfig) -> bool:
    """``verbose=true`` or Hydra's own ``hydra.verbose=...``: show the libraries' INFO lines too."""
    from hydra.core.hydra_config import HydraConfig

    hydra_verbose = HydraConfig.initialized() and bool(HydraConfig.get().verbose)
    return bool(cfg.get("verbose", False)) or hydra_verbose


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    with report_user_errors():
        metrics = train(cfg)
    # Hydra sweepers (Optuna) maximise this value.
    value = metrics.get(f"{cfg.get('optimized_metric')}_best")
    return None if value is None else float(value)


def main() -> float | None:
    """Console entry point: ``python -m fne_lightning.train`` / ``fne-train``."""
    # In place: Lightning's DDP launcher re-runs sys.argv for the other ranks.
    with report_user_errors():
        sys.argv[1:] = resume_args(normalize_experiment_args(sys.argv[1:]))
    return hydra_main()


if __name__ == "__main__":
    main()
