"""Figures that show false-negative elimination at work, as pure functions of arrays.

* :func:`similarity_figure`: histograms of the positive and negative similarities FNE fits its
  two Gaussians to (FNE_SPEC section 4), the fitted Gaussians, the false-negative posterior
  p_fn(s) of section 5 (computed by :func:`sampling.false_negative_posterior`, not re-derived),
  the flagging threshold ``1 - false_margin`` and the cut-down ``mu+ - cutdown`` of section 6.
* :func:`retrieval_examples` + :func:`retrieval_figure`: a few fixed queries with their top-k
  results, each result marked as the query's own pair, another true match (the dataset's
  extra positives, FNE_SPEC section 10) or no match.
* :class:`SimilarityReservoir`: the bounded sample of recent confident similarities that the
  histograms are drawn from, filled during training without any host sync.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot (no global state, the Agg
canvas), so they work in training processes, threads and notebooks alike.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from fne_lightning.components.positives import PositiveIndex
from fne_lightning.components.ranking import topk_neighbours
from fne_lightning.components.sampling import false_negative_posterior
from fne_lightning.components.stats import confident_samples

# Marks of a retrieved item; None = unknown (e.g. a free-text query).
PAIRED, TRUE_MATCH, NO_MATCH = 2, 1, 0
MARKS = {PAIRED: ("paired", "#2ca02c", "✓"), TRUE_MATCH: ("true match", "#1f77b4", "≈"),
         NO_MATCH: ("no match", "#d62728", "✗"), None: ("", "#7f7f7f", "")}


class SimilarityReservoir:
    """Ring buffers of the most recent confident positive and negative similarities.

    ``add`` takes the same in-batch online similarities as ``SimilarityStats.update`` and keeps
    the samples the Gaussians are fitted on (``stats.confident_samples``): S_ii of confidently
    matched pairs and their hardest in-batch negatives. Entries that are not samples are stored
    as NaN, so every write has a fixed size and the pointer is a host integer: no host sync in
    the training step. ``samples()`` (once per epoch) syncs and drops the NaNs.
    """

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: expected >= 1")
        self.capacity = capacity
        self.pos: Tensor | None = None  # (C,)
        self.neg: Tensor | None = None  # (2C,): two negatives per positive
        self._ptr = [0, 0]

    def reset(self) -> None:
        if self.pos is not None:
            self.pos.fill_(float("nan"))
            self.neg.fill_(float("nan"))
        self._ptr = [0, 0]

    @torch.no_grad()
    def add(self, image_features: Tensor, text_features: Tensor, image_ids: Tensor) -> None:
        """One batch: online features (B, D) of pair i and image ids (B,)."""
        v, t = image_features.detach().float(), text_features.detach().float()
        same = image_ids[:, None] == image_ids[None, :]  # (B, B)
        with torch.autocast(v.device.type, enabled=False):  # fp32, as the statistics (bf16 under autocast)
            pos, pos_mask, neg, neg_mask = confident_samples(v @ t.T, same)
        if self.pos is None:
            self.pos = v.new_full((self.capacity,), float("nan"))
            self.neg = v.new_full((2 * self.capacity,), float("nan"))
        nan = v.new_full((), float("nan"))
        for k, (buf, values) in enumerate(((self.pos, torch.where(pos_mask, pos, nan)),
                                           (self.neg, torch.where(neg_mask, neg, nan)))):
            values = values[-buf.numel():].to(buf.dtype)  # a batch larger than the buffer keeps its tail
            n = values.numel()
            index = torch.arange(self._ptr[k], self._ptr[k] + n, device=buf.device) % buf.numel()
            buf.index_copy_(0, index, values)
            self._ptr[k] = (self._ptr[k] + n) % buf.numel()

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives) seen so far, as float64 NumPy arrays (host sync)."""
        if self.pos is None:
            return np.zeros(0), np.zeros(0)
        pos, neg = self.pos.double().cpu().numpy(), self.neg.double().cpu().numpy()
        return pos[np.isfinite(pos)], neg[np.isfinite(neg)]


def _figure(width: float, height: float, dpi: int = 100, layout: str | None = "constrained") -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _normal_pdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (x - mean) ** 2 / var) / np.sqrt(2 * np.pi * var)


def similarity_figure(pos_scores: np.ndarray, neg_scores: np.ndarray,
                      gaussians: Sequence[float] | None = None, *, match_prior: float | None = None,
                      cutdown: float | None = None, false_margin: float | None = None,
                      title: str = "") -> Any:
    """Histograms of positive/negative similarities, fitted Gaussians, p_fn(s) and the cut-down.

    ``pos_scores``, ``neg_scores``: 1-D samples (e.g. ``SimilarityReservoir.samples()``);
    ``gaussians``: ``(pos_mean, pos_var, neg_mean, neg_var)`` or None (a loss without FNE
    statistics: histograms only); ``match_prior`` (with ``gaussians``) adds the posterior panel,
    ``false_margin`` its flagging threshold ``1 - false_margin``, ``cutdown`` the line at
    ``mu+ - cutdown`` below which candidates get weight 0. Returns a matplotlib Figure.
    """
    pos, neg = np.asarray(pos_scores, dtype=np.float64), np.asarray(neg_scores, dtype=np.float64)
    posterior = gaussians is not None and match_prior is not None
    fig = _figure(7.0, 5.2 if posterior else 3.2)
    axes = fig.subplots(2 if posterior else 1, 1, sharex=True, squeeze=False)[:, 0]
    ends = [pos.min(initial=1), neg.min(initial=1), pos.max(initial=-1), neg.max(initial=-1)]
    if gaussians is not None:
        pm, pv, nm, nv = (float(g) for g in gaussians)
        ends += [pm - 4 * pv**0.5, pm + 4 * pv**0.5, nm - 4 * nv**0.5, nm + 4 * nv**0.5]
    lo, hi = max(min(ends), -1.0), min(max(ends), 1.0)
    if not lo < hi:
        lo, hi = -1.0, 1.0
    grid = np.linspace(lo, hi, 400)
    ax = axes[0]
    bins = np.linspace(lo, hi, 61)
    for values, colour, name in ((pos, "#2ca02c", "positives"), (neg, "#d62728", "hardest negatives")):
        if values.size:
            ax.hist(values, bins=bins, density=True, alpha=0.35, color=colour, label=f"{name} (n={values.size})")
    if gaussians is not None:
        ax.plot(grid, _normal_pdf(grid, pm, pv), color="#2ca02c", lw=2,
                label=f"N+  mean {pm:.3f}, std {pv**0.5:.3f}")
        ax.plot(grid, _normal_pdf(grid, nm, nv), color="#d62728", lw=2,
                label=f"N-  mean {nm:.3f}, std {nv**0.5:.3f}")
    ax.set_ylabel("density")
    ax.set_title(title or "similarities of confidently matched pairs", fontsize=10)
    if posterior:
        ax = axes[1]
        p_fn = false_negative_posterior(torch.from_numpy(grid).float(), pm, pv, nm, nv, match_prior).double().numpy()
        ax.plot(grid, np.clip(p_fn, 1e-12, 1.0), color="black", lw=2, label=f"p_fn(s), match_prior {match_prior:g}")
        ax.set_yscale("log")
        ax.set_ylim(1e-12, 2.0)
        ax.set_ylabel("P(false negative | s)")
        if false_margin is not None:
            threshold = 1.0 - false_margin
            ax.axhline(threshold, color="#9467bd", ls=":", label=f"flagged above {threshold:g}")
            ax.fill_between(grid, 1e-12, 2.0, where=p_fn > threshold, color="#9467bd", alpha=0.12)
    if gaussians is not None and cutdown is not None:
        for ax in axes:  # candidates at or below mu+ - cutdown get weight 0
            ax.axvline(pm - cutdown, color="#ff7f0e", ls="--", label=f"cut-down: mu+ - {cutdown:g}")
            ax.axvspan(lo, max(lo, pm - cutdown), color="#ff7f0e", alpha=0.08)
    for ax in axes:
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("cosine similarity s")
    axes[-1].set_xlim(lo, hi)
    return fig


@dataclass
class RetrievalExamples:
    """Top-k results of a few queries; marks are PAIRED, TRUE_MATCH or NO_MATCH."""

    text_queries: np.ndarray  # (Q,) caption indices
    text_results: np.ndarray  # (Q, k) image indices, best first
    text_marks: np.ndarray  # (Q, k)
    image_queries: np.ndarray  # (Q,) image indices
    image_results: np.ndarray  # (Q, k) caption indices, best first
    image_marks: np.ndarray  # (Q, k)


@torch.no_grad()
def retrieval_examples(image_features: Tensor, text_features: Tensor, text_to_image: Tensor,
                       positive_pairs: Tensor | None = None, num_queries: int = 4, k: int = 5,
                       seed: int = 0) -> RetrievalExamples:
    """Top-``k`` images of ``num_queries`` captions and top-``k`` captions of as many images.

    ``image_features`` (N_img, D) and ``text_features`` (N_txt, D) in dataset order,
    ``text_to_image`` (N_txt,), ``positive_pairs`` (P, 2) (image, caption) true matches or None.
    Queries are drawn with ``seed``, so every epoch shows the same ones.
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    rng = np.random.default_rng(seed)
    text_q = np.sort(rng.choice(n_txt, size=min(num_queries, n_txt), replace=False))
    image_q = np.sort(rng.choice(n_img, size=min(num_queries, n_img), replace=False))
    img, txt = image_features.float().cpu(), text_features.float().cpu()
    t2i = text_to_image.long().cpu()
    index = PositiveIndex()
    index.set_pairs(None if positive_pairs is None else positive_pairs.cpu(), n_txt)

    def marks(images: Tensor, captions: Tensor) -> np.ndarray:
        mark = torch.where(index.contains(images, captions), TRUE_MATCH, NO_MATCH)
        return torch.where(t2i[captions] == images, PAIRED, mark).numpy()

    text_res = topk_neighbours(txt[text_q], img, k)[1]  # (Q, k)
    image_res = topk_neighbours(img[image_q], txt, k)[1]  # (Q, k)
    text_q_t, image_q_t = torch.from_numpy(text_q), torch.from_numpy(image_q)
    return RetrievalExamples(
        text_q, text_res.numpy(), marks(text_res, text_q_t[:, None]),
        image_q, image_res.numpy(), marks(image_q_t[:, None], image_res),
    )


def open_image(path: str | Path) -> Image.Image:
    """RGB image from a file, file closed."""
    with Image.open(path) as image:
        return image.convert("RGB")


def thumbnail(image: Image.Image, mark: int | None = None, size: int = 96) -> Image.Image:
    """Square RGB thumbnail with a border in the colour of ``mark`` (none when None)."""
    thumb = ImageOps.fit(image.convert("RGB"), (size, size))
    return thumb if mark is None else ImageOps.expand(thumb, border=max(2, size // 16), fill=MARKS[mark][1])


TextRow = tuple[str, list[tuple[Image.Image, int | None]]]  # caption, [(image, mark)]
ImageRow = tuple[Image.Image, list[tuple[str, int | None]]]  # image, [(caption, mark)]


def example_rows(examples: RetrievalExamples, captions: Sequence[str],
                 load_image: Callable[[int], Image.Image]) -> tuple[list[TextRow], list[ImageRow]]:
    """Resolve indices into captions and (bordered) thumbnails for the figure and tables."""
    thumbs: dict[int, Image.Image] = {}  # unmarked thumbnails: an image may appear several times

    def thumb(i: int) -> Image.Image:
        if i not in thumbs:
            thumbs[i] = thumbnail(load_image(i))
        return thumbs[i]

    text_rows = [(captions[q], [(thumbnail(thumb(int(i)), int(m)), int(m)) for i, m in zip(res, mk, strict=True)])
                 for q, res, mk in zip(examples.text_queries, examples.text_results, examples.text_marks, strict=True)]
    image_rows = [(thumb(int(q)), [(captions[c], int(m)) for c, m in zip(res, mk, strict=True)])
                  for q, res, mk in zip(examples.image_queries, examples.image_results, examples.image_marks,
                                        strict=True)]
    return text_rows, image_rows


def retrieval_figure(text_rows: Sequence[TextRow], image_rows: Sequence[ImageRow] = (), title: str = "",
                     cell: int = 112) -> Any:
    """Grid: each caption query with its top-k images, each image query with its top-k captions.

    Images are drawn as given (use :func:`thumbnail` for marked borders), fitted into square
    cells of ``cell`` pixels; captions are coloured by their mark. Returns a matplotlib Figure.
    """
    k = max([len(r[1]) for r in [*text_rows, *image_rows]], default=1)
    n_rows = max(len(text_rows) + len(image_rows), 1)
    # One composite image on one axes plus text: ~50 axes would cost more than the drawing.
    step = cell + 8
    canvas = Image.new("RGB", ((k + 1) * step, n_rows * step), "white")
    texts: list[tuple[int, int, str, str, int]] = []  # column, row, text, colour, wrap width
    for r, (caption, images) in enumerate(text_rows):
        texts.append((0, r, caption, "black", 22))
        for c, (image, _) in enumerate(images, start=1):
            canvas.paste(ImageOps.contain(image, (cell, cell)), (c * step + 4, r * step + 4))
    for r, (image, captions) in enumerate(image_rows, start=len(text_rows)):
        canvas.paste(ImageOps.contain(image, (cell, cell)), (4, r * step + 4))
        for c, (caption, mark) in enumerate(captions, start=1):
            _, colour, symbol = MARKS[mark]
            texts.append((c, r, f"{symbol} {caption}".strip(), colour, 20))
    dpi, title_in = 80, 0.35
    fig = _figure(canvas.width / dpi, canvas.height / dpi + title_in, dpi=dpi, layout=None)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - title_in / (canvas.height / dpi + title_in)))
    ax.imshow(np.asarray(canvas))
    ax.set_axis_off()
    for c, r, text, colour, width in texts:
        lines = "\n".join(textwrap.wrap(text, width)[:6])
        ax.text((c + 0.5) * step, (r + 0.5) * step, lines, fontsize=7.5, color=colour, va="center", ha="center",
                style="italic" if c == 0 else "normal")
    legend = "   ".join(f"{symbol} {name}" for m, (name, _, symbol) in MARKS.items() if m is not None)
    fig.suptitle(f"{title}  (borders / colours: {legend})".strip(), fontsize=9)
    return fig


def table_data(text_rows: Sequence[TextRow], image_rows: Sequence[ImageRow],
               image: Callable[[Image.Image, str], Any] = lambda im, label: im) -> dict[str, tuple[list, list]]:
    """Columns and rows of two tables (``t2i`` and ``i2t``) of the examples, e.g. for ``wandb.Table``.

    ``image(picture, label)`` wraps each picture (e.g. ``wandb.Image(picture, caption=label)``).
    """
    k = max([len(r[1]) for r in [*text_rows, *image_rows]], default=0)
    ranks = [f"top {r + 1}" for r in range(k)]
    t2i = [[caption, *(image(im, MARKS[m][0]) for im, m in items)] for caption, items in text_rows]
    i2t = [[image(im, "query"), *(f"{MARKS[m][2]} {c}".strip() for c, m in items)] for im, items in image_rows]
    return {"t2i": (["caption", *ranks], t2i), "i2t": (["image", *ranks], i2t)}


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
