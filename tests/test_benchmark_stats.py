"""The paired statistics of benchmarks/synthetic_fn.py: differences, t-intervals, rebasing."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_fn.py"


@pytest.fixture(scope="module")
def synthetic_fn():
    spec = importlib.util.spec_from_file_location("synthetic_fn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics(rsum: float, i2t: float, t2i: float, sampled: float) -> dict[str, float]:
    return {"test/rsum": rsum, "test/i2t_map_at_r": i2t, "test/t2i_map_at_r": t2i,
            "test/i2t_rprecision": i2t + 1, "test/t2i_rprecision": t2i + 1,
            "test/i2t_any_r1": i2t + 2, "test/t2i_any_r1": t2i + 2,
            "fne/sampled_fn_rate": sampled, "fne/hardest_fn_rate": 0.2}


RESULTS = {  # three methods, three seeds; every difference is non-zero and differs by seed
    "vsepp": {0: metrics(300.0, 10.0, 20.0, 0.15), 1: metrics(320.0, 12.0, 22.0, 0.14), 2: metrics(310.0, 11.0, 21.0, 0.16)},
    "fne": {0: metrics(305.0, 10.5, 20.5, 0.12), 1: metrics(321.0, 12.0, 23.0, 0.12), 2: metrics(318.0, 11.0, 22.0, 0.13)},
    "fne_x": {0: metrics(301.0, 11.0, 21.0, 0.06), 1: metrics(330.0, 13.0, 23.0, 0.07), 2: metrics(313.0, 12.0, 21.0, 0.05)},
}


def test_paired_differences_and_t_interval_against_a_hand_computation(synthetic_fn) -> None:
    rows = {r["method"]: r for r in synthetic_fn.paired(RESULTS, "fne")}
    assert set(rows) == {"vsepp", "fne_x"}
    diffs = [301.0 - 305.0, 330.0 - 321.0, 313.0 - 318.0]  # fne_x - fne, per seed
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    rsum = rows["fne_x"]["test_rsum"]
    assert rsum["diffs"] == pytest.approx(diffs)
    assert rsum["mean"] == pytest.approx(statistics.fmean(diffs), abs=0.01)
    assert rsum["ci95"] == pytest.approx([statistics.fmean(diffs) - half, statistics.fmean(diffs) + half], abs=0.01)
    # mAP@R is the mean of both directions; FN rates are in percent.
    assert rows["fne_x"]["map_at_r"]["diffs"] == pytest.approx([0.5, 0.5, 0.0])
    assert rows["fne_x"]["sampled_fn_rate"]["diffs"] == pytest.approx([-6.0, -5.0, -8.0])


def test_rebase_equals_pairing_against_the_new_baseline(synthetic_fn) -> None:
    """A stored result keeps only the differences against vsepp; rebasing them onto fne must give
    what pairing against fne gives from the raw metrics (vsepp included, as -(fne - vsepp))."""
    rebased = {r["method"]: r for r in synthetic_fn.rebase(synthetic_fn.paired(RESULTS, "vsepp"), "fne")}
    direct = {r["method"]: r for r in synthetic_fn.paired(RESULTS, "fne")}
    assert set(rebased) == set(direct) == {"vsepp", "fne_x"}
    for method, row in direct.items():
        for name in synthetic_fn.PAIRED:
            assert rebased[method][name]["diffs"] == pytest.approx(row[name]["diffs"], abs=0.011)
            assert rebased[method][name]["ci95"] == pytest.approx(row[name]["ci95"], abs=0.02)


def test_rebase_from_a_stored_file_and_a_bad_file(synthetic_fn, tmp_path: Path) -> None:
    stored = tmp_path / "synthetic_fn.json"
    stored.write_text(json.dumps({"methods": [], "paired": synthetic_fn.paired(RESULTS, "vsepp")}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rebase", str(stored)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| method - fne (paired by seed) |" in proc.stdout
    assert "| fne_x | +0.00 [-19.40, +19.40] |" in proc.stdout  # rsum -4, +9, -5: mean 0, half-width 4.303 sd / sqrt 3
    bad = tmp_path / "bad.json"
    bad.write_text('{"methods": []}')
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rebase", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"--rebase {bad}: expected a synthetic_fn.json with a 'paired' list "
                                                "('paired')"]


def test_oracle_headroom_share_and_the_bar_against_a_hand_computation(synthetic_fn) -> None:
    """Issue 31's share of the oracle's headroom, ``(method - baseline) / (oracle - baseline)`` of the
    mean paired differences with the family's best oracle, and the bar's verdict."""
    results = {
        "vsepp": {s: metrics(300.0 + s, 10.0 + s, 20.0 + s, 0.2) for s in range(3)},
        "fne": {s: metrics(304.0 + s, 10.5 + s, 20.9 + s, 0.1) for s in range(3)},  # +0.7 mAP@R each seed
        "vsepp_oracle": {s: metrics(302.0 + s, 11.0 + s, 21.0 + s, 0.0) for s in range(3)},  # +1.0
        "fne_oracle": {s: metrics(299.0 + s, 10.2 + s, 20.0 + s, 0.0) for s in range(3)},  # +0.1
        "infonce": {s: metrics(310.0 + s, 9.0 + s, 19.0 + s, 0.2) for s in range(3)},  # lower mAP@R
    }
    shares = {h["method"]: h for h in synthetic_fn.headroom(results)}
    assert set(shares) == {"fne"}  # the infonce family has no oracle here
    assert shares["fne"]["oracle"] == "vsepp_oracle"  # the family's oracle of the largest mAP@R gain
    assert shares["fne"]["map_at_r"] == pytest.approx(0.7 / 1.0, abs=1e-3)
    assert shares["fne"]["test_rsum"] == pytest.approx(4.0 / 2.0, abs=1e-3)
    assert synthetic_fn.best_baseline(synthetic_fn.summarise(results)) == "vsepp"
    (line,) = synthetic_fn.bar(results, "very_high")  # the highest density: the bar's first half
    # The same +0.7 on every seed: a zero-width interval above zero, on R-Precision too (+0.7).
    assert line.startswith("very_high: fne beats the best plain baseline (vsepp) on mAP@R +0.70 [+0.70, +0.70]")
    assert line.endswith("share of its family's oracle headroom on mAP@R: 0.70; the bar at the highest density: met")
    # At the lowest density the bar asks only that a method be no worse than its own baseline.
    (line,) = synthetic_fn.bar(results, "low")
    assert line.endswith("against its own baseline (vsepp): mAP@R +0.70 [+0.70, +0.70], R-Precision +0.70 "
                         "[+0.70, +0.70]: not worse beyond noise")
    worse = {**results, "fne": {s: metrics(304.0 + s, 9.5 + s, 19.9 + s, 0.1) for s in range(3)}}  # -0.3 each
    (line,) = synthetic_fn.bar(worse, "low")
    assert line.endswith("-0.30 [-0.30, -0.30]: worse beyond noise")
    (line,) = synthetic_fn.bar({**results, "vsepp_oracle": {s: metrics(302.0 + s, 12.0 + s, 22.0 + s, 0.0)
                                                            for s in range(3)}}, "very_high")
    assert line.endswith("headroom on mAP@R: 0.35; the bar at the highest density: not met")  # 0.7 / 2.0
    # Between the ends (medium, high) the bar states nothing beyond the comparison.
    (line,) = synthetic_fn.bar(results, "high")
    assert line.endswith("share of its family's oracle headroom on mAP@R: 0.70")


def test_the_oracles_are_the_methods_that_read_the_true_matches(synthetic_fn) -> None:
    """The posterior's attraction (infonce_fne_attract) is a false-negative method like the others:
    it gets a share of its family's oracle headroom and a verdict; infonce_attract is an oracle."""
    assert synthetic_fn.ORACLES == {"vsepp_oracle", "fne_oracle", "infonce_oracle", "infonce_attract",
                                    "siglip_oracle", "siglip_attract"}
    results = {
        "infonce": {s: metrics(300.0 + s, 10.0 + s, 20.0 + s, 0.2) for s in range(3)},
        "infonce_attract": {s: metrics(250.0 + s, 14.0 + s, 24.0 + s, 0.0) for s in range(3)},  # +4.0 mAP@R
        "infonce_fne_attract": {s: metrics(240.0 + s, 9.0 + s, 19.0 + s, 0.1) for s in range(3)},  # -1.0
    }
    (share,) = synthetic_fn.headroom(results)
    assert (share["method"], share["oracle"]) == ("infonce_fne_attract", "infonce_attract")
    assert share["map_at_r"] == pytest.approx(-1.0 / 4.0, abs=1e-3)
    (line,) = synthetic_fn.bar(results, "high")
    assert line.startswith("high: infonce_fne_attract does not beat the best plain baseline (infonce)")


def test_a_failed_run_stops_the_study_with_its_error_and_writes_no_result(tmp_path: Path) -> None:
    """Two runs at once (--jobs 2): a run that fails stops the study with the run's own error, the
    runs not started are dropped, and no summary is written as if the study had finished."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--density", "high", "--seeds", "0", "1", "--jobs", "2",
                           "--smoke", "--methods", "vsepp", "--out", str(tmp_path), "loss.no_such_key=1"],
                          capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode != 0
    assert "pretrain seed " in proc.stderr and "failed:" in proc.stderr
    assert "loss.no_such_key" in proc.stderr  # the run's own error, not a traceback of the pool
    assert not list(tmp_path.rglob("synthetic_fn_*.json")) and not list(tmp_path.rglob("metrics.json"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "0", "--out", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "--jobs: expected a positive number of runs at once, got 0"
