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
    python benchmarks/synthetic_fn.py --density high --jobs 2  # issue 31's study at one density, 2 runs at once
    python benchmarks/synthetic_fn.py --seeds 0 --smoke        # tiny data, 1 epoch each: checks it runs
    python benchmarks/synthetic_fn.py --rebase benchmarks/results/synthetic_fn_2026-12-02_cpu-2core.json
                                          # no runs: the stored result's variants against fne
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_name.py beside this script
from results_name import result_name  # noqa: E402

from fne_lightning.data.synthetic import FN_DENSITIES  # noqa: E402  (numpy and PIL only, no torch)

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
    "fne_online_queue": ["loss=fne", "loss.queue_features=online"],
    # The contrastive family (issue 29): plain, FNE's posterior, distillation.
    "infonce": ["loss=infonce"],
    "infonce_fne": ["loss=infonce", "loss.false_negatives=fne", "loss.memory_size=1024"],
    "infonce_distill": ["loss=infonce", "loss.false_negatives=distill"],
    # FNE's posterior with the candidates' base rate estimated (a mixture fitted online) instead of the
    # published prior of 1e-4: weighting the denominator, or attracting by each negative's expected
    # label, p_fn (the posterior's counterpart of infonce_attract; in-batch, as that oracle is).
    "infonce_fne_estimated": ["loss=infonce", "loss.false_negatives=fne", "loss.prior=estimated"],
    "infonce_fne_attract": ["loss=infonce", "loss.false_negatives=fne", "loss.prior=estimated",
                            "loss.fne_action=attract"],
    "siglip": ["loss=siglip"],
    "siglip_fne": ["loss=siglip", "loss.false_negatives=fne"],
    # Oracles: the declared true matches, each bounding its own family's selection rule.
    "vsepp_oracle": ["loss=vsepp", "loss.oracle=true"],
    "fne_oracle": ["loss=fne", "loss.oracle=true"],
    "infonce_oracle": ["loss=infonce", "loss.false_negatives=oracle", "loss.oracle_action=eliminate"],
    "infonce_attract": ["loss=infonce", "loss.false_negatives=oracle", "loss.oracle_action=attract"],
    "siglip_oracle": ["loss=siglip", "loss.false_negatives=oracle", "loss.oracle_action=eliminate"],
    "siglip_attract": ["loss=siglip", "loss.false_negatives=oracle", "loss.oracle_action=attract"],
}
# Each method's family (the plain loss it changes) and role; a method's gain is measured against its
# family's plain baseline and bounded by its family's best oracle.
FAMILIES = {"triplet": "vsepp", "infonce": "infonce", "siglip": "siglip"}
FAMILY = {m: "infonce" if m.startswith("infonce") else "siglip" if m.startswith("siglip") else "triplet"
          for m in METHODS}
# Oracles: the methods that read the declared true matches (not infonce_fne_attract, which attracts
# by FNE's posterior and is judged like every other false-negative method).
ORACLES = {m for m, overrides in METHODS.items()
           if "loss.oracle=true" in overrides or "loss.false_negatives=oracle" in overrides}
# The study of issue 31: every plain baseline, every false-negative method, every oracle.
STUDY = ["vsepp", "fne", "fne_online", "fne_online_queue", "vsepp_oracle", "fne_oracle", "infonce", "infonce_fne",
         "infonce_distill", "infonce_fne_estimated", "infonce_fne_attract", "infonce_oracle", "infonce_attract",
         "siglip", "siglip_fne", "siglip_oracle"]
# data.fn_density's levels, lowest first, as the package defines them (the bar: first half at the last).
DENSITIES = tuple(FN_DENSITIES)
SMOKE = ["data.num_train=64", "data.num_val=16", "data.num_test=16", "data.batch_size=32"]
PRETRAIN = ["experiment=synthetic", "loss=vse0", "test=false"]
COLUMNS = {
    "test_rsum": lambda m: m["test/rsum"],
    "map_at_r": lambda m: (m["test/i2t_map_at_r"] + m["test/t2i_map_at_r"]) / 2,
    "i2t_map_at_r": lambda m: m["test/i2t_map_at_r"],
    "t2i_map_at_r": lambda m: m["test/t2i_map_at_r"],
    "rprecision": lambda m: (m["test/i2t_rprecision"] + m["test/t2i_rprecision"]) / 2,
    "any_r1": lambda m: (m.get("test/i2t_any_r1", math.nan) + m.get("test/t2i_any_r1", math.nan)) / 2,
    # Diagnostics a loss does not report (the contrastive losses sample no negative) are nan.
    "sampled_fn_rate": lambda m: 100 * m.get("fne/sampled_fn_rate", math.nan),
    "hardest_fn_rate": lambda m: 100 * m.get("fne/hardest_fn_rate", math.nan),
    "fn_mass": lambda m: 100 * m.get("fne/fn_mass", math.nan),
}
PAIRED = ("test_rsum", "map_at_r", "rprecision", "any_r1", "sampled_fn_rate")
# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


class RunFailed(RuntimeError):
    """A training or export subprocess exited non-zero (its stderr's tail is the message)."""


# Torch threads of each subprocess: the machine's cores shared by the runs going at once (--jobs).
THREADS: dict[str, str] = {}


def entry_point(module: str, args: list[str], what: str) -> None:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", f"fne_lightning.{module}", *args], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **THREADS})
    if proc.returncode != 0:
        raise RunFailed(f"{what} failed:\n{proc.stderr[-3000:]}")
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
                              "trainer.enable_progress_bar=false", "figures.enabled=false", *extra],
                    f"{method} seed {seed}")
    return json.loads(metrics_file.read_text())


def run_study(seeds: list[int], methods: list[str], out: Path, extra: list[str], fine_extra: list[str],
              epochs: int, jobs: int) -> dict[str, dict[int, dict[str, float]]]:
    """Every seed's pretrained start, then every (seed, method) fine-tune, ``jobs`` subprocesses at
    a time (each run is a process of its own, so runs at once only share the cores: each gets
    ``cores // jobs`` torch threads unless OMP_NUM_THREADS is set). Seed by seed in the queue, so an
    interrupted study has whole seeds to compare."""
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        THREADS["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        # The next seed's pretraining is queued ahead of this seed's fine-tunes, so a free worker
        # starts it while the others fine-tune.
        starts = {seeds[0]: pool.submit(pretrained, seeds[0], out, extra, epochs)}
        runs = {}
        for k, seed in enumerate(seeds):
            export = starts[seed].result()
            if k + 1 < len(seeds):
                starts[seeds[k + 1]] = pool.submit(pretrained, seeds[k + 1], out, extra, epochs)
            runs.update({(m, seed): pool.submit(finetune, m, seed, export, out, fine_extra) for m in methods})
        return {m: {s: runs[(m, s)].result() for s in seeds} for m in methods}
    finally:  # after a failure, the runs not yet started are dropped; those running finish
        pool.shutdown(wait=True, cancel_futures=True)


def first_epoch(out: Path, seeds: list[int], method: str = "infonce") -> dict[str, float] | None:
    """How dense the false negatives are when fine-tuning starts: the first epoch's mean share of
    in-batch negatives that truly match (``fn_base_rate``) and of hardest in-batch negatives that
    do (``hardest_fn_rate``), averaged over the seeds' ``method`` runs (their ``csv/metrics.csv``;
    plain InfoNCE logs both and changes no candidate). None if no run of it logged them."""
    found: dict[str, list[float]] = {"fn_base_rate": [], "hardest_fn_rate": []}
    for seed in seeds:
        log = out / method / f"seed{seed}" / "csv" / "metrics.csv"
        if not log.is_file():
            continue
        rows = [r for r in csv.DictReader(log.open()) if r.get("epoch") == "0"]
        for name, values in found.items():
            epoch = [float(r[f"fne/{name}_epoch"]) for r in rows if r.get(f"fne/{name}_epoch")]
            values.extend(epoch[:1])
    if not all(found.values()):
        return None
    return {"method": method, "seeds": len(found["fn_base_rate"]),
            **{name: round(100 * statistics.fmean(v), 2) for name, v in found.items()}}


def mean_std(values: list[float]) -> tuple[float, float]:
    if any(math.isnan(v) for v in values):  # a column the method does not report
        return math.nan, math.nan
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


def ci(d: dict[str, object]) -> str:
    """A paired difference as ``mean [low, high]`` (its 95% t-interval)."""
    return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


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


def best_baseline(rows: list[dict[str, object]]) -> str | None:
    """The plain baseline (of any family) with the highest mean mAP@R, or None if none was run."""
    plain = [r for r in rows if r["method"] in FAMILIES.values()]
    return max(plain, key=lambda r: r["map_at_r"])["method"] if plain else None


def headroom(results: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, object]]:
    """Each false-negative method's share of its family's oracle headroom, on mAP@R and rsum:
    ``(method - baseline) / (oracle - baseline)`` of the mean paired differences, with the family's
    oracle of the largest mean mAP@R gain (eliminate or attract). None where the oracle gains
    nothing on that metric (no headroom to share)."""
    rows = []
    for family, baseline in FAMILIES.items():
        if baseline not in results:
            continue
        diffs = {p["method"]: p for p in paired(results, baseline)}
        oracles = [m for m in diffs if m in ORACLES and FAMILY[m] == family]
        if not oracles:
            continue
        oracle = max(oracles, key=lambda m: diffs[m]["map_at_r"]["mean"])
        for method, p in diffs.items():
            if FAMILY[method] != family or method in ORACLES:
                continue
            row: dict[str, object] = {"method": method, "baseline": baseline, "oracle": oracle}
            for name in ("map_at_r", "test_rsum"):
                room = diffs[oracle][name]["mean"]
                row[name] = round(p[name]["mean"] / room, 3) if room > 0 else None
            rows.append(row)
    return rows


def bar(results: dict[str, dict[int, dict[str, float]]], density: str) -> list[str]:
    """The verdict of issue 31's bar at this density, one line per statement, with the numbers."""
    rows = summarise(results)
    best = best_baseline(rows)
    if best is None:
        return ["no plain baseline was run"]
    shares = {h["method"]: h for h in headroom(results)}
    own = {p["method"]: p for base in FAMILIES.values() if base in results for p in paired(results, base)
           if FAMILY[p["method"]] == FAMILY[base]}
    lines = []
    for p in paired(results, best):
        method = p["method"]
        if method in ORACLES or method in FAMILIES.values():
            continue
        above = all(p[k]["ci95"][0] > 0 for k in ("map_at_r", "rprecision"))
        share = shares.get(method, {}).get("map_at_r")
        verdict = "beats" if above else "does not beat"
        line = (f"{density}: {method} {verdict} the best plain baseline ({best}) on mAP@R {ci(p['map_at_r'])} "
                f"and R-Precision {ci(p['rprecision'])}; share of its family's oracle headroom on mAP@R: "
                + (f"{share:.2f}" if share is not None else "none (the oracle gains nothing)"))
        if density == DENSITIES[-1]:  # the bar's first half: both intervals above zero and half the headroom
            met = above and share is not None and share >= 0.5
            line += f"; the bar at the highest density: {'met' if met else 'not met'}"
        elif density == "low" and method in own:  # its second half: not worse than its own baseline
            mine = own[method]
            worse = any(mine[k]["ci95"][1] < 0 for k in ("map_at_r", "rprecision"))
            line += (f"; against its own baseline ({mine['baseline']}): mAP@R {ci(mine['map_at_r'])}, "
                     f"R-Precision {ci(mine['rprecision'])}: {'worse' if worse else 'not worse'} beyond noise")
        lines.append(line)
    return lines


def markdown(rows: list[dict[str, object]], *pair_tables: list[dict[str, object]]) -> str:
    cell = lambda r, k: "–" if math.isnan(r[k]) else f"{r[k]:.1f} ± {r[k + '_std']:.1f}"  # noqa: E731
    text = ""
    if rows:
        text += ("| method | test rsum | mAP@R (%) | i2t / t2i mAP@R | R-Precision (%) | any R@1 (%) | sampled FN (%) "
                 "| hardest FN (%) | push on true matches (%) |\n|---|---|---|---|---|---|---|---|---|\n")
        text += "".join(f"| {r['method']} | {cell(r, 'test_rsum')} | {cell(r, 'map_at_r')} | "
                        f"{r['i2t_map_at_r']:.1f} / {r['t2i_map_at_r']:.1f} | {cell(r, 'rprecision')} | "
                        f"{cell(r, 'any_r1')} | {cell(r, 'sampled_fn_rate')} | {cell(r, 'hardest_fn_rate')} | "
                        f"{cell(r, 'fn_mass')} |\n" for r in rows)
    for pairs in filter(None, pair_tables):
        text += (f"\n| method - {pairs[0]['baseline']} (paired by seed) | rsum: mean [95% CI] | mAP@R: mean [95% CI] | "
                 "R-Precision: mean [95% CI] | per-seed rsum differences |\n|---|---|---|---|---|\n")
        text += "".join(f"| {p['method']} | {ci(p['test_rsum'])} | {ci(p['map_at_r'])} | {ci(p['rprecision'])} | "
                        f"{', '.join(f'{d:+.1f}' for d in p['test_rsum']['diffs'])} |\n" for p in pairs)
    return text


def figure(files: list[Path], out: Path) -> None:
    """Gain over the best plain baseline against false-negative density, one line per method with
    its 95% interval and the oracles dashed, on mAP@R and rsum, from the stored results of each
    density (``--figure``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = sorted((json.loads(f.read_text()) for f in files), key=lambda r: DENSITIES.index(r["density"]))
    densities = [r["density"] for r in stored]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (name, label) in zip(axes, (("map_at_r", "mAP@R"), ("test_rsum", "rsum")), strict=True):
        methods = sorted({p["method"] for r in stored for p in r["paired_best"]}, key=list(METHODS).index)
        for k, method in enumerate(methods):
            xs, means, lows, highs = [], [], [], []
            for x, r in enumerate(stored):
                row = next((p for p in r["paired_best"] if p["method"] == method), None)
                if row is not None:
                    xs.append(x + (k - len(methods) / 2) * 0.015)
                    means.append(row[name]["mean"])
                    lows.append(row[name]["mean"] - row[name]["ci95"][0])
                    highs.append(row[name]["ci95"][1] - row[name]["mean"])
            style = "--" if method in ORACLES else "-"
            # tab20: a colour of its own for each of the study's 16 methods (tab10 repeats after 10).
            ax.errorbar(xs, means, yerr=[lows, highs], fmt=style + "o", ms=3, lw=1, capsize=2, label=method,
                        color=plt.cm.tab20(k % 20))
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(range(len(densities)), [f"{d}\nvs {r['best_baseline']}" for d, r in zip(densities, stored, strict=True)])
        ax.set_xlabel("false-negative density (data.fn_density), and its best plain baseline")
        ax.set_ylabel(f"{label} - best plain baseline (paired, 95% CI)")
        ax.set_title(f"gain over the best plain baseline: {label}")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.subplots_adjust(left=0.06, right=0.84, bottom=0.17, top=0.92, wspace=0.25)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="default: the study (STUDY) with --density, else the FNE variants of 2026-12-01/02")
    parser.add_argument("--density", choices=DENSITIES, default=None,
                        help="data.fn_density of every run; its runs go to <out>/<density>")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_synthetic_fn"))
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each a subprocess with cores/jobs torch threads (2 on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch per phase (checks the script runs)")
    parser.add_argument("--rebase", type=Path, metavar="JSON",
                        help="no runs: print the paired table against fne from a stored synthetic_fn.json")
    parser.add_argument("--figure", type=Path, nargs="+", metavar="JSON",
                        help="no runs: draw the gain-against-density figure from stored results of --density runs")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.figure is not None:
        out = args.out / result_name("synthetic_fn_density", "png")
        figure(args.figure, out)
        print(out)
        return
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
    methods = args.methods or (STUDY if args.density else [m for m in METHODS if FAMILY[m] == "triplet"
                                                              and m not in ORACLES and m != "fne_online_queue"])
    out = args.out / args.density if args.density else args.out
    extra = (SMOKE if args.smoke else []) + ([f"data.fn_density={args.density}"] if args.density else []) + args.overrides
    fine_extra = extra + (["trainer.max_epochs=1"] if args.smoke else [])
    if args.jobs < 1:
        sys.exit(f"--jobs: expected a positive number of runs at once, got {args.jobs}")
    try:
        results = run_study(args.seeds, methods, out, extra, fine_extra, 1 if args.smoke else 10, args.jobs)
    except RunFailed as err:
        sys.exit(str(err))
    rows = summarise(results)
    # Against each family's plain baseline, the best plain baseline overall, and the published rule.
    by_family = [p for base in FAMILIES.values() if base in results for p in paired(results, base)
                 if FAMILY[p["method"]] == FAMILY[base]]
    best = best_baseline(rows)
    pairs_best = paired(results, best) if best else []
    pairs_fne = paired(results, "fne") if "fne" in results and not args.density else []
    shares, verdict = headroom(results), bar(results, args.density or "low") if args.density else []
    start = first_epoch(out, args.seeds)
    for row in [*rows, *by_family, *pairs_best, *pairs_fne, *shares]:
        print(json.dumps(row))
    # One table per family (each against its own baseline), then against the best plain baseline.
    family_tables = [[p for p in by_family if p["baseline"] == base] for base in FAMILIES.values()]
    table = markdown(rows, *family_tables, pairs_best, pairs_fne)
    none = lambda x: "none: the oracle gains nothing" if x is None else x  # noqa: E731
    if shares:
        table += ("\n| method | family oracle | share of the oracle's headroom: mAP@R | rsum |\n|---|---|---|---|\n"
                  + "".join(f"| {h['method']} | {h['oracle']} | {none(h['map_at_r'])} | {none(h['test_rsum'])} |\n"
                          for h in shares))
    if verdict:
        table += "\n" + "\n".join(f"- {line}" for line in verdict) + "\n"
    if start:
        table += (f"\nFirst epoch of fine-tuning ({start['method']}, {start['seeds']} seeds): "
                  f"{start['fn_base_rate']:.2f}% of in-batch negatives truly match; the hardest is a true "
                  f"match {start['hardest_fn_rate']:.2f}% of the time.\n")
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    # Named by date and machine (results_name.py), ready to be copied into benchmarks/results/.
    stem = f"synthetic_fn_{args.density}" if args.density else "synthetic_fn"
    (out / result_name(stem, "md")).write_text(table)
    (out / result_name(stem, "json")).write_text(json.dumps(
        {"density": args.density, "seeds": args.seeds, "methods": rows, "paired": by_family,
         "best_baseline": best, "paired_best": pairs_best, "paired_fne": pairs_fne, "headroom": shares,
         "bar": verdict, "first_epoch": start,
         # Every run's metrics, so a later study can add seeds to this one or recompute its tables.
         "runs": {m: {str(s): by_seed[s] for s in sorted(by_seed)} for m, by_seed in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
