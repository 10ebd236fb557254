"""Which evidence separates false negatives from true negatives? Measured on trained models.

For each run directory given (a ``fne_lightning.train`` run on data that declares its positives,
e.g. the fine-tunes of ``benchmarks/synthetic_fn.py``), the script embeds the test split with
``python -m fne_lightning.evaluate ... save_embeddings=true`` and scores every (anchor, candidate)
pair of different images, in both directions, as FNE's bank would: each image is paired with one
of its captions (as in a bank slot) and each caption with its image. The classes are the test
split's declared positives: a candidate truly matches its anchor (a false negative, were it used
as one) or not. For each piece of evidence the script reports the ROC AUC of true matches against
true negatives, over all candidates and over the hardest 5% by score (where FNE draws):

* ``score``: the anchor-candidate cosine (all the published posterior uses);
* ``image_image`` / ``caption_caption``: the cosine of the candidate's paired image to the
  anchor's image / of the candidate's paired caption to the anchor's caption (the bank holds
  both modalities of a slot, so these are cheap);
* ``score_minus_own``: the score minus the candidate's score with its own pair (does the
  candidate fit the anchor nearly as well as its own pairing?);
* ``score+lam*<e>``: the best of ``score + lam * e`` over lam in (0.25, 0.5, 1, 2, 4), for each
  evidence e (its lam chosen on all candidates, then applied to the hardest 5%).

Both directions score the same set of (image, caption) pairs, so ``score`` and the symmetric
evidence give the same AUC in both; only ``score_minus_own`` differs.

It also draws, for the first run, the distributions of the candidate scores per class with the
Gaussians the run's FNE loss had fitted (from ``last.ckpt``) and their posterior at the
published prior, and writes ``fn_evidence_<date>_<machine>.{json,md,png}`` into ``--out``.

    python benchmarks/fn_evidence.py outputs/bench_synthetic_fn/fne/seed{0,1,2,3,4} --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_name.py beside this script
from results_name import result_name  # noqa: E402

LAMBDAS = (0.25, 0.5, 1.0, 2.0, 4.0)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney ROC AUC of ``labels`` (bool) by ``scores``, ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def embed(run_dir: Path, out: Path) -> Path:
    """The test split's embeddings of ``run_dir``'s last checkpoint (computed once)."""
    target = out / "embeddings" / run_dir.parent.name / run_dir.name
    npz = target / "embeddings.npz"
    if not npz.is_file():
        proc = subprocess.run([sys.executable, "-m", "fne_lightning.evaluate",
                               f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "save_embeddings=true",
                               f"hydra.run.dir={target}"], capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            sys.exit(f"evaluate of {run_dir} failed:\n{proc.stderr[-2000:]}")
    return npz


def candidates(npz: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Evidence and labels of every (anchor, candidate) pair of different images, per direction."""
    d = np.load(npz)
    v, t, t2i, pairs = d["image_features"], d["text_features"], d["text_to_image"], d["positive_pairs"]
    n_img, n_txt = len(v), len(t)
    truth = np.zeros((n_img, n_txt), dtype=bool)
    truth[pairs[:, 0], pairs[:, 1]] = True
    rng = np.random.default_rng(seed)
    pair_caption = np.array([rng.choice(np.flatnonzero(t2i == i)) for i in range(n_img)])  # a bank slot's caption
    s, ii, tt = v @ t.T, v @ v.T, t @ t.T
    own_image_score = s[np.arange(n_img), pair_caption]  # each image with its slot's caption
    own_caption_score = s[t2i, np.arange(n_txt)]  # each caption with its image
    valid = t2i[None, :] != np.arange(n_img)[:, None]  # (images, captions): different images
    i2t = {"label": truth[valid], "score": s[valid], "image_image": ii[:, t2i][valid],
           "caption_caption": tt[pair_caption][valid], "score_minus_own": (s - own_caption_score[None, :])[valid]}
    valid_t = valid.T  # (captions, images)
    t2i_ = {"label": truth.T[valid_t], "score": s.T[valid_t], "image_image": ii[t2i][valid_t],
            "caption_caption": tt[:, pair_caption][valid_t],
            "score_minus_own": (s.T - own_image_score[None, :])[valid_t]}
    return {"i2t": i2t, "t2i": t2i_}


def measure(cands: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    out: dict[str, float] = {}
    evidence = ("score", "image_image", "caption_caption", "score_minus_own")
    for direction, c in cands.items():
        y = c["label"]
        hard = c["score"] >= np.quantile(c["score"], 0.95)
        out[f"{direction}/base_rate"] = float(y.mean())
        out[f"{direction}/base_rate_hardest5"] = float(y[hard].mean())
        for e in evidence:
            out[f"{direction}/{e}"] = auc(c[e], y)
            out[f"{direction}/{e}_hardest5"] = auc(c[e][hard], y[hard])
        for e in evidence[1:]:
            combos = [(auc(c["score"] + lam * c[e], y), lam) for lam in LAMBDAS]
            best, lam = max(combos)
            out[f"{direction}/score+lam*{e}"] = best
            out[f"{direction}/score+lam*{e}_lam"] = lam
            out[f"{direction}/score+lam*{e}_hardest5"] = auc(c["score"][hard] + lam * c[e][hard], y[hard])
    return out


def gaussians(run_dir: Path) -> tuple[float, float, float, float] | None:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    sd = ckpt["state_dict"]
    if "loss.stats.pos_count" not in sd:
        return None
    var = lambda n, m2: max(float(m2) / max(float(n) - 1, 1.0), 1e-6)  # noqa: E731
    return (float(sd["loss.stats.pos_mean"]), var(sd["loss.stats.pos_count"], sd["loss.stats.pos_m2"]),
            float(sd["loss.stats.neg_mean"]), var(sd["loss.stats.neg_count"], sd["loss.stats.neg_m2"]))


def figure(cands: dict[str, dict[str, np.ndarray]], fitted: tuple[float, float, float, float] | None,
           path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    grid = np.linspace(-0.6, 1.0, 400)
    # Both directions score the same (image, caption) pairs, so one direction's scores, on a linear
    # and a log scale (the tails are where negatives are drawn).
    c = cands["i2t"]
    for ax, scale in zip(axes, ("linear", "log"), strict=True):
        y, s = c["label"], c["score"]
        bins = np.linspace(-0.6, 1.0, 81)
        ax.hist(s[~y], bins=bins, density=True, alpha=0.5, color="tab:blue",
                label=f"true negatives ({(~y).sum():,})")
        ax.hist(s[y], bins=bins, density=True, alpha=0.6, color="tab:red", label=f"true matches ({y.sum():,})")
        if fitted is not None:
            pm, pv, nm, nv = fitted
            pdf = lambda m, var: np.exp(-(grid - m) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)  # noqa: E731
            ax.plot(grid, pdf(pm, pv), color="darkred", lw=1.5, label=f"fitted N+ ({pm:.2f}, {np.sqrt(pv):.2f})")
            ax.plot(grid, pdf(nm, nv), color="navy", lw=1.5, label=f"fitted N- ({nm:.2f}, {np.sqrt(nv):.2f})")
            ax.axvline(pm - 0.2, color="grey", ls="--", lw=1, label="cut-down mu+ - 0.2")
        ax.set_yscale(scale)
        if scale == "log":
            ax.set_ylim(1e-3, 20)
        ax.set_title(f"candidate scores by class (density, {scale} scale)")
        ax.set_xlabel("anchor-candidate cosine")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="training run directories (with checkpoints/last.ckpt)")
    parser.add_argument("--out", type=Path, default=Path("outputs/fn_evidence"))
    args = parser.parse_args()
    per_run = {}
    for i, run in enumerate(args.runs):
        cands = candidates(embed(run, args.out))
        per_run[str(run)] = measure(cands)
        if i == 0:
            figure(cands, gaussians(run), args.out / result_name("fn_evidence", "png"),
                   f"{run}: test-split candidates of the trained model, with the Gaussians its FNE loss fitted")
    keys = list(next(iter(per_run.values())))
    summary = {k: round(statistics.fmean(r[k] for r in per_run.values()), 4) for k in keys}
    print(json.dumps({"runs": list(per_run), "mean": summary}))
    rows = ["score", "image_image", "caption_caption", "score_minus_own", "score+lam*image_image",
            "score+lam*caption_caption", "score+lam*score_minus_own"]
    table = ("| evidence | i2t AUC | i2t AUC, hardest 5% | t2i AUC | t2i AUC, hardest 5% |\n"
             "|---|---|---|---|---|\n")
    table += "".join(f"| {r} | {summary[f'i2t/{r}']:.3f} | {summary[f'i2t/{r}_hardest5']:.3f} | "
                     f"{summary[f't2i/{r}']:.3f} | {summary[f't2i/{r}_hardest5']:.3f} |\n" for r in rows)
    table += (f"\nBase rate of true matches: {100 * summary['i2t/base_rate']:.2f}% of all candidates, "
              f"{100 * summary['i2t/base_rate_hardest5']:.1f}% of the hardest 5% (i2t); means over "
              f"{len(per_run)} run(s).\n")
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / result_name("fn_evidence", "md")).write_text(table)
    (args.out / result_name("fn_evidence", "json")).write_text(json.dumps({"runs": per_run, "mean": summary}, indent=1))


if __name__ == "__main__":
    main()
