"""Does FNE avoid false negatives, and does it help? Paired comparisons on the synthetic benchmark.

The paper's regime: towers pretrained first, then the loss under test. For every seed the script

1. pretrains once: ``experiment=synthetic loss=vse0 trainer.max_epochs=10`` (the recipe's VSE0
   warm-up from random init, the same 10 epochs every loss of ``experiment=synthetic`` starts with),
2. exports that model (``python -m fne_lightning.export``, an open_clip directory),
3. fine-tunes every method from that identical start: ``experiment=synthetic_finetune
   model.name=local-dir:<export>`` (4 epochs at lr 5e-5, same seed, so the same data order),

through the real entry points, one subprocess per run, and reads each run's ``metrics.json``.
The warm-up's variance is shared by all methods of a seed, so per-seed differences between
methods measure the methods. Prints one JSON object per method (mean and std over seeds of test
rsum, mAP@R and R-Precision in both directions, sampled and hardest FN rates) and per method
against ``vsepp`` and against the published ``fne`` (per-seed paired differences, their mean and a
95% t-interval), and writes them as markdown and JSON into ``--out``. Runs whose ``metrics.json`` exists are skipped, so an
interrupted benchmark resumes.

    python benchmarks/synthetic_fn.py --seeds 0 1 2 3 4       # docs: results/synthetic-fn (35-45 min on 2 cores)
    python benchmarks/synthetic_fn.py --seeds 0 --smoke        # tiny data, 1 epoch each: checks it runs
    python benchmarks/synthetic_fn.py --rebase benchmarks/results/synthetic_fn_2026-12-02_cpu-2core.json
                                          # no runs: the stored result's variants against fne
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_name.py beside this script
from results_name import result_name  # noqa: E402

METHODS = {
    "vsepp": ["loss=vsepp"],
    "fne_hardest": ["loss=fne", "loss.selection=hardest"],
    "fne": ["loss=fne"],
    "fne_complement": ["loss=fne", "loss.weighting=complement"],
    "fne_complement_prior": ["loss=fne", "loss.weighting=complement", "loss.match_prior=0.01"],
    # Beyond the published rule (docs: results/synthetic-fn), one idea per row, then together.
    "fne_estimated_prior": ["loss=fne", "loss.weighting=complement", "loss.prior=estimated"],
    "fne_exclude": ["loss=fne", "loss.exclude=0.5"],
    "fne_estimated_exclude": ["loss=fne", "loss.prior=estimated", "loss.exclude=0.5"],
    "fne_online": ["loss=fne", "loss.online_batch=true"],
}
SMOKE = ["data.num_train=64", "data.num_val=16", "data.num_test=16", "data.batch_size=32"]
PRETRAIN = ["experiment=synthetic", "loss=vse0", "test=false"]
COLUMNS = {
    "test_rsum": lambda m: m["test/rsum"],
    "map_at_r": lambda m: (m["test/i2t_map_at_r"] + m["test/t2i_map_at_r"]) / 2,
    "i2t_map_at_r": lambda m: m["test/i2t_map_at_r"],
    "t2i_map_at_r": lambda m: m["test/t2i_map_at_r"],
    "rprecision": lambda m: (m["test/i2t_rprecision"] + m["test/t2i_rprecision"]) / 2,
    "sampled_fn_rate": lambda m: 100 * m["fne/sampled_fn_rate"],
    "hardest_fn_rate": lambda m: 100 * m["fne/hardest_fn_rate"],
}
PAIRED = ("test_rsum", "map_at_r", "rprecision", "sampled_fn_rate")
# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def entry_point(module: str, args: list[str], what: str) -> None:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", f"fne_lightning.{module}", *args], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    print(f"# {what}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)


def pretrained(seed: int, out: Path, extra: list[str], epochs: int = 10) -> Path:
    """The exported VSE0-pretrained model of ``seed`` (trained and exported once)."""
    run_dir, export = out / "pretrain" / f"seed{seed}", out / "pretrain" / f"seed{seed}" / "export"
    if not (export / "open_clip_config.json").is_file():
        entry_point("train", [*PRETRAIN, f"trainer.max_epochs={epochs}", f"seed={seed}", f"hydra.run.dir={run_dir}",
                              "trainer.enable_progress_bar=false", *extra], f"pretrain seed {seed}")
        entry_point("export", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}",
                               "overwrite=true", f"hydra.run.dir={run_dir / 'export_log'}"], f"export seed {seed}")
    return export


def finetune(method: str, seed: int, export: Path, out: Path, extra: list[str]) -> dict[str, float]:
    run_dir = out / method / f"seed{seed}"
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        entry_point("train", ["experiment=synthetic_finetune", f"model.name=local-dir:{export.resolve()}",
                              *METHODS[method], f"seed={seed}", f"hydra.run.dir={run_dir}",
                              "trainer.enable_progress_bar=false", *extra], f"{method} seed {seed}")
    return json.loads(metrics_file.read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, object]]:
    rows = []
    for method, by_seed in results.items():
        row: dict[str, object] = {"method": method, "seeds": sorted(by_seed)}
        for name, get in COLUMNS.items():
            row[name], row[f"{name}_std"] = (round(x, 2) for x in mean_std([get(m) for m in by_seed.values()]))
        rows.append(row)
    return rows


def interval(diffs: list[float]) -> dict[str, object]:
    """Per-seed differences, their mean and the 95% t-interval of the mean (n - 1 degrees of freedom)."""
    mean, std = mean_std(diffs)
    half = T95.get(len(diffs) - 1, 1.96) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"diffs": [round(d, 2) for d in diffs], "mean": round(mean, 2),
            "ci95": [round(mean - half, 2), round(mean + half, 2)]}


def paired(results: dict[str, dict[int, dict[str, float]]], baseline: str = "vsepp") -> list[dict[str, object]]:
    """Per-seed differences method - baseline (same pretrained start), mean and 95% t-interval."""
    rows = []
    for method, by_seed in results.items():
        if method == baseline or baseline not in results:
            continue
        seeds = sorted(set(by_seed) & set(results[baseline]))
        row: dict[str, object] = {"method": method, "baseline": baseline, "seeds": seeds}
        for name in PAIRED:
            get = COLUMNS[name]
            row[name] = interval([get(by_seed[s]) - get(results[baseline][s]) for s in seeds])
        rows.append(row)
    return rows


def rebase(pairs: list[dict[str, object]], baseline: str) -> list[dict[str, object]]:
    """The paired rows against ``baseline`` from rows against another method (a stored result file
    keeps only the differences): (m - old) - (baseline - old) per seed is m - baseline, and the old
    baseline itself is -(baseline - old)."""
    by_method = {p["method"]: p for p in pairs}
    if baseline not in by_method:
        raise SystemExit(f"rebase: no paired row for {baseline!r} (have: {', '.join(by_method)})")
    base = by_method[baseline]
    old = {"method": base["baseline"], "baseline": base["baseline"], "seeds": base["seeds"],
           **{name: {"diffs": [0.0] * len(base["seeds"])} for name in PAIRED}}
    rows = []
    for p in [old, *pairs]:
        if p["method"] == baseline:
            continue
        if p["seeds"] != base["seeds"]:
            raise SystemExit(f"rebase: {p['method']} has seeds {p['seeds']}, {baseline} has {base['seeds']}")
        rows.append({"method": p["method"], "baseline": baseline, "seeds": p["seeds"],
                     **{name: interval([a - b for a, b in zip(p[name]["diffs"], base[name]["diffs"], strict=True)])
                        for name in PAIRED}})
    return rows


def markdown(rows: list[dict[str, object]], *pair_tables: list[dict[str, object]]) -> str:
    cell = lambda r, k: f"{r[k]:.1f} ± {r[k + '_std']:.1f}"  # noqa: E731
    text = ""
    if rows:
        text += ("| method | test rsum | mAP@R (%) | i2t / t2i mAP@R | R-Precision (%) | sampled FN (%) | hardest FN (%) |\n"
                 "|---|---|---|---|---|---|---|\n")
        text += "".join(f"| {r['method']} | {cell(r, 'test_rsum')} | {cell(r, 'map_at_r')} | "
                        f"{r['i2t_map_at_r']:.1f} / {r['t2i_map_at_r']:.1f} | {cell(r, 'rprecision')} | "
                        f"{cell(r, 'sampled_fn_rate')} | {cell(r, 'hardest_fn_rate')} |\n" for r in rows)
    fmt = lambda d: f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"  # noqa: E731
    for pairs in filter(None, pair_tables):
        text += (f"\n| method - {pairs[0]['baseline']} (paired by seed) | rsum: mean [95% CI] | mAP@R: mean [95% CI] | "
                 "R-Precision: mean [95% CI] | per-seed rsum differences |\n|---|---|---|---|---|\n")
        text += "".join(f"| {p['method']} | {fmt(p['test_rsum'])} | {fmt(p['map_at_r'])} | {fmt(p['rprecision'])} | "
                        f"{', '.join(f'{d:+.1f}' for d in p['test_rsum']['diffs'])} |\n" for p in pairs)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_synthetic_fn"))
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch per phase (checks the script runs)")
    parser.add_argument("--rebase", type=Path, metavar="JSON",
                        help="no runs: print the paired table against fne from a stored synthetic_fn.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.rebase is not None:
        try:
            pairs = json.loads(args.rebase.read_text())["paired"]
        except (OSError, ValueError, KeyError) as err:
            sys.exit(f"--rebase {args.rebase}: expected a synthetic_fn.json with a 'paired' list ({err})")
        rebased = rebase(pairs, "fne")
        for row in rebased:
            print(json.dumps(row))
        print("\n" + markdown([], rebased))
        return
    extra = (SMOKE if args.smoke else []) + args.overrides
    fine_extra = extra + (["trainer.max_epochs=1"] if args.smoke else [])
    results: dict[str, dict[int, dict[str, float]]] = {m: {} for m in args.methods}
    for seed in args.seeds:  # seed by seed: an interrupted benchmark has whole seeds to compare
        export = pretrained(seed, args.out, extra, epochs=1 if args.smoke else 10)
        for method in args.methods:
            results[method][seed] = finetune(method, seed, export, args.out, fine_extra)
    # Against VSE++ (does it help?) and against the published rule (does a variant improve on it?).
    rows, pairs, pairs_fne = summarise(results), paired(results), paired(results, "fne")
    for row in [*rows, *pairs, *pairs_fne]:
        print(json.dumps(row))
    table = markdown(rows, pairs, pairs_fne)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    # Named by date and machine (results_name.py), ready to be copied into benchmarks/results/.
    (args.out / result_name("synthetic_fn", "md")).write_text(table)
    (args.out / result_name("synthetic_fn", "json")).write_text(
        json.dumps({"methods": rows, "paired": pairs, "paired_fne": pairs_fne}, indent=1))


if __name__ == "__main__":
    main()
