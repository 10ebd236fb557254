"""Figures that show false-negative elimination at work, as pure functions of arrays.

* :func:`similarity_figure`: histograms of the positive and negative similarities FNE fits its
  two Gaussians to (FNE_SPEC section 4), the fitted Gaussians, the false-negative posterior
  p_fn(s) of section 5 (computed by
  :func:`~fne_lightning.fne.negatives.false_negative_posterior`, not re-derived), the flagging
  threshold ``1 - false_margin`` and the cut-down ``mu+ - cutdown`` of section 6.
* :func:`example_rows` + :func:`retrieval_figure`: the examples of
  :func:`~fne_lightning.retrieval.examples.retrieval_examples` (a few fixed queries with their
  top-k results, each marked as the query's own pair, another true match or no match) as
  bordered thumbnails and coloured captions.

The samples of the histograms come from :class:`~fne_lightning.callbacks.SimilarityReservoir`
during training, and the callback shapes the examples into W&B tables.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot (no global state, the Agg
canvas), so they work in training processes, threads and notebooks alike.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from fne_lightning.fne.negatives import false_negative_posterior
from fne_lightning.retrieval.examples import MARKS, RetrievalExamples


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

    Args:
        pos_scores: 1-D samples of positive similarities (e.g. the first array of
            :meth:`SimilarityReservoir.samples() <fne_lightning.callbacks.SimilarityReservoir.samples>`).
        neg_scores: 1-D samples of negative similarities.
        gaussians: ``(pos_mean, pos_var, neg_mean, neg_var)``, or None for a loss without FNE
            statistics (histograms only).
        match_prior: with ``gaussians``, adds the panel of the posterior p_fn(s).
        cutdown: with ``gaussians``, the line at ``mu+ - cutdown`` below which candidates get
            weight 0.
        false_margin: the posterior panel's flagging threshold ``1 - false_margin``.
        title: the figure's title (default: "similarities of confidently matched pairs").

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    pos, neg = np.asarray(pos_scores, dtype=np.float64), np.asarray(neg_scores, dtype=np.float64)
    posterior = gaussians is not None and match_prior is not None
    height = 5.2 if posterior else 3.2
    # Fixed margins (inches) instead of the constrained layout, which measured 40% of the drawing
    # (0.15 of 0.35 s, every validation epoch); the labels and tick labels here have fixed widths.
    fig = _figure(7.0, height, layout=None)
    fig.subplots_adjust(left=0.8 / 7.0, right=1.0 - 0.15 / 7.0, top=1.0 - 0.35 / height, bottom=0.5 / height,
                        hspace=0.08)
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


def thumbnail(image: Image.Image, mark: int | None = None, size: int = 96) -> Image.Image:
    """Square RGB thumbnail of ``image``, bordered in the colour of ``mark``.

    Args:
        image: any PIL image.
        mark: ``PAIRED``, ``TRUE_MATCH``, ``NO_MATCH`` (of :mod:`fne_lightning.retrieval.examples`)
            or None for no border.
        size: the side in pixels.
    """
    thumb = ImageOps.fit(image.convert("RGB"), (size, size))
    return thumb if mark is None else ImageOps.expand(thumb, border=max(2, size // 16), fill=MARKS[mark][1])


TextRow = tuple[str, list[tuple[Image.Image, int | None]]]  # caption, [(image, mark)]
ImageRow = tuple[Image.Image, list[tuple[str, int | None]]]  # image, [(caption, mark)]


def example_rows(examples: RetrievalExamples, captions: Sequence[str],
                 load_image: Callable[[int], Image.Image]) -> tuple[list[TextRow], list[ImageRow]]:
    """Resolve the indices of ``examples`` into captions and (bordered) thumbnails.

    Args:
        examples: the output of :func:`~fne_lightning.retrieval.examples.retrieval_examples`.
        captions: the split's captions, by caption index.
        load_image: image index -> PIL image.

    Returns:
        ``(text_rows, image_rows)`` for :func:`retrieval_figure` and the W&B tables: each text
        row a caption with its ``(thumbnail, mark)`` results, each image row a thumbnail with its
        ``(caption, mark)`` results.
    """
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
    cells; captions are coloured by their mark.

    Args:
        text_rows: caption queries with their image results (:func:`example_rows`).
        image_rows: image queries with their caption results.
        title: the figure's title.
        cell: the side of a cell in pixels.

    Returns:
        A ``matplotlib.figure.Figure``.
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


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG file, creating its directory.

    Args:
        fig: a matplotlib figure.
        path: where to write it.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
