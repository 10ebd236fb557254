"""Hydra multirun sweeps and the Optuna search through the real CLI, and the sweep summary files."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import yaml

from fne_lightning.sweep import varying_keys, write_results

from conftest import TINY_OVERRIDES, compose_config
from helpers import offline_env, run_entry_point

# One epoch of FNE (no warm-up) per job, without figures or progress bars: the sweep machinery is
# under test here.
QUIET = [*TINY_OVERRIDES, "trainer.max_epochs=1", "loss.warmup_epochs=0", "figures.enabled=false",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # One intra-op thread: the tiny model gains nothing from more, and on a busy machine OpenMP
    # threads that wait for each other made each job several times slower.
    return run_entry_point("train", *args, cwd=cwd, env=offline_env(OMP_NUM_THREADS="1"), timeout=timeout)


def read_results(sweep_dir: Path) -> list[dict[str, str]]:
    assert (sweep_dir / "sweep_results.md").is_file()
    return list(csv.DictReader(open(sweep_dir / "sweep_results.csv", encoding="utf-8")))


def test_multirun_sweep_writes_one_result_row_per_run(tmp_path: Path, cache_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", *QUIET, "loss.cutdown=0.1,0.3", f"paths.cache_dir={cache_dir}",
                   f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(sweep_dir)
    assert [(r["job"], r["status"], r["loss.cutdown"]) for r in rows] == [("0", "ok", "0.1"), ("1", "ok", "0.3")]
    for row in rows:
        metrics = json.loads((sweep_dir / row["job"] / "metrics.json").read_text())
        assert float(row["val/rsum_best"]) == metrics["val/rsum_best"] > 0
        assert float(row["test/rsum"]) == metrics["test/rsum"]
        assert 0 <= float(row["fne/sampled_fn_rate"]) <= 1 and row["fne/hardest_fn_rate"]
    table = (sweep_dir / "sweep_results.md").read_text()
    assert "`loss.cutdown=0.1`" in table and "`loss.cutdown=0.3`" in table and "best val rsum" in table
    assert "sweep_results.csv" in proc.stdout


def test_optuna_search_composes_and_runs_trials(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_config(["hparams_search=cutdown_optuna"], tmp_path)
    assert cfg.optimized_metric == "val/rsum"
    sweep_dir = tmp_path / "optuna"
    proc = run_cli("hparams_search=cutdown_optuna", "hydra.sweeper.n_trials=2", *QUIET,
                   f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"loss.cutdown", "loss.tau", "loss.match_prior"}
    rows = read_results(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert result["best_value"] == max(float(r["val/rsum_best"]) for r in rows)
    for row in rows:  # each trial drew its values inside the search space
        assert 0.05 <= float(row["loss.cutdown"]) <= 0.4 and 0.1 <= float(row["loss.tau"]) <= 2.0
        assert 1e-5 <= float(row["loss.match_prior"]) <= 1e-2


def test_failed_jobs_are_rows_without_results(tmp_path: Path) -> None:
    for job, overrides, metrics in (("0", ["loss.cutdown=0.1"], {"val/rsum_best": 300.0, "test/rsum": 290.5}),
                                    ("1", ["loss.cutdown=0.2"], None), ("10", ["loss.cutdown=0.3"], {})):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if metrics is not None:
            (tmp_path / job / "metrics.json").write_text(json.dumps(metrics))
    write_results(tmp_path)
    rows = read_results(tmp_path)
    assert [(r["job"], r["status"], r["val/rsum_best"]) for r in rows] == [
        ("0", "ok", "300.0"), ("1", "failed", ""), ("10", "failed", "")]
    table = (tmp_path / "sweep_results.md").read_text()
    assert "| **0** |" in table and "| failed |" in table


def test_varying_keys_do_not_depend_on_job_order() -> None:
    # loss.tau is set in one job only: it varies whether that job comes first or not.
    jobs = [{"overrides": ["loss.cutdown=0.1"]}, {"overrides": ["loss.cutdown=0.1", "loss.tau=0.5"]},
            {"overrides": ["loss.cutdown=0.2"]}]
    assert varying_keys(jobs) == ["loss.cutdown", "loss.tau"]
    assert varying_keys(jobs[::-1]) == ["loss.cutdown", "loss.tau"]
    assert varying_keys(jobs[:2]) == ["loss.tau"]
