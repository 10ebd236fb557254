"""Does FNE avoid false negatives, and does it help? The synthetic benchmark, 4 losses x N seeds.

Trains ``experiment=synthetic`` (tiny model from random init: VSE0 warm-up, then the loss
under test) with

* ``vsepp``          ``loss=vsepp``                       hardest in-batch negative (online features)
* ``fne_hardest``    ``loss=fne loss.selection=hardest``  hardest negative over batch + bank (momentum)
* ``fne_reference``  ``loss=fne``                         FNE sampling, published weighting
* ``fne_complement`` ``loss=fne loss.weighting=complement``

through the real entry point, one subprocess per run, and reads each run's ``metrics.json``:
test rsum, multi-positive mAP@R (mean of both directions) and the last epoch's
``fne/sampled_fn_rate`` (share of the negatives actually used that truly match their anchor)
vs ``fne/hardest_fn_rate`` (the same for the hardest candidate). Prints one JSON object per
variant and a markdown table (mean +- std over seeds), also written to ``--out``.

    python benchmarks/synthetic_fn.py --seeds 0 1 2             # the README table (~40 min on 2 cores)
    python benchmarks/synthetic_fn.py --seeds 0 --smoke          # tiny data, 2 epochs: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "vsepp": ["loss=vsepp"],
    "fne_hardest": ["loss=fne", "loss.selection=hardest"],
    "fne_reference": ["loss=fne"],
    "fne_complement": ["loss=fne", "loss.weighting=complement"],
}
SMOKE = ["data.num_train=64", "data.num_val=16", "data.num_test=16", "data.batch_size=32",
         "trainer.max_epochs=2", "loss.warmup_epochs=1", "optim.scheduler.milestones=[1]"]
COLUMNS = {
    "test_rsum": lambda m: m["test/rsum"],
    "test_map_at_r": lambda m: (m["test/i2t_map_at_r"] + m["test/t2i_map_at_r"]) / 2,
    "sampled_fn_rate": lambda m: 100 * m["fne/sampled_fn_rate"],
    "hardest_fn_rate": lambda m: 100 * m["fne/hardest_fn_rate"],
}


def run(variant: str, seed: int, out: Path, extra: list[str]) -> dict[str, float]:
    run_dir = out / variant / f"seed{seed}"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():  # resume an interrupted benchmark
        return json.loads(metrics_file.read_text())
    cmd = [sys.executable, "-m", "fne_lightning.train", "experiment=synthetic", *VARIANTS[variant],
           f"seed={seed}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        sys.exit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    print(f"# {variant} seed {seed}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(metrics_file.read_text())


def summarise(results: dict[str, list[dict[str, float]]]) -> list[dict[str, object]]:
    rows = []
    for variant, runs in results.items():
        row: dict[str, object] = {"variant": variant, "seeds": len(runs)}
        for name, get in COLUMNS.items():
            values = [get(m) for m in runs]
            row[name] = round(statistics.fmean(values), 2)
            row[f"{name}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    head = "| loss | test rsum | mAP@R (%) | sampled FN rate (%) | hardest FN rate (%) |\n|---|---|---|---|---|\n"
    cell = lambda r, k: f"{r[k]:.1f} ± {r[k + '_std']:.1f}"  # noqa: E731
    return head + "".join(
        f"| {r['variant']} | {cell(r, 'test_rsum')} | {cell(r, 'test_map_at_r')} | "
        f"{cell(r, 'sampled_fn_rate')} | {cell(r, 'hardest_fn_rate')} |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_synthetic_fn"))
    parser.add_argument("--smoke", action="store_true", help="tiny data and 2 epochs (checks the script runs)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    extra = (SMOKE if args.smoke else []) + args.overrides
    results = {v: [run(v, s, args.out, extra) for s in args.seeds] for v in args.variants}
    rows = summarise(results)
    for row in rows:
        print(json.dumps(row))
    table = markdown(rows)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthetic_fn.md").write_text(table)


if __name__ == "__main__":
    main()
