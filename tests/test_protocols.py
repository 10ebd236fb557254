"""Published protocols (``protocol=eccv``) against the official code.

Our ECCV Caption, CxC and COCO 5K / 1K metrics (vectorised, from the score matrix) must equal, to
1e-9, what the official ``eccv_caption`` package's functions compute from the rankings of the same
scores, on a COCO-5K-sized split made of the package's own ids; the zero-shot path's R@K must
equal ``clip_benchmark``'s retrieval evaluation of the same open_clip model on the same images and
captions. Both packages are test-only dependencies (the ``test`` extra).

The package takes rankings and breaks no ties; our metrics count a tie against the query (at
equal scores non-positive items rank first). The rankings given to the package follow that rule:
each query's best items by score, equal scores ordered non-positives first (``np.lexsort``), per
protocol, since what is a positive differs between protocols.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

from fne_lightning.data.protocols import (
    ECCV_FILES,
    build_eccv_protocol,
    eccv_directory,
    load_protocol,
    read_eccv_files,
)
from fne_lightning.errors import FNEError
from fne_lightning.evaluate import evaluate
from fne_lightning.retrieval import protocols
from fne_lightning.retrieval.protocols import protocol_scores
from fne_lightning.retrieval.ranking import retrieval_scores

from helpers import compose_task, run_entry_point

eccv_caption = pytest.importorskip("eccv_caption")


def _bench_eval():
    """benchmarks/bench_eval.py, whose structured protocol features this test shares."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_eval"] = module
    spec.loader.exec_module(module)
    return module


BENCH_EVAL = _bench_eval()

KS = (1, 5, 10)
PROTOCOL_KEYS = {  # our key (without direction) -> the package's name
    "eccv/map_at_r": "eccv_map_at_r", "eccv/rprecision": "eccv_rprecision", "eccv/r1": "eccv_r1",
    **{f"{p}/r{k}": f"{name}_r{k}" for p, name in (("cxc", "cxc"), ("coco5k", "coco_5k"), ("coco1k", "coco_1k"))
       for k in KS},
}


# ----------------------------------------------------------------------------- official side
def ranked_lists(scores: torch.Tensor, query_ids: list[int], item_ids: np.ndarray,
                 positives: dict[int, list[int]], length: int) -> tuple[dict[int, list[int]], np.ndarray]:
    """The package's input: each query's ``length`` best item ids by score, equal scores
    non-positives first (``np.lexsort``). Also returns, per query, how many first positions are
    exact: those scoring above the best item left out (ties with it could be in any order)."""
    top = torch.topk(scores, min(length + 1, scores.shape[1]), dim=1)
    values, idx = top.values.double().numpy(), top.indices.numpy()
    if length < scores.shape[1]:
        exact = (values[:, :length] > values[:, length : length + 1]).sum(1)
    else:
        exact = np.full(len(query_ids), length)
    ids = item_ids[idx[:, :length]]  # (Q, L)
    q_pos = np.repeat(np.arange(len(query_ids)), ids.shape[1])
    pos_keys = {(q, i) for q, qid in enumerate(query_ids) for i in positives.get(qid, ())}
    flat = ids.reshape(-1)
    rel = np.fromiter(((q, i) in pos_keys for q, i in zip(q_pos.tolist(), flat.tolist(), strict=True)),
                      bool, flat.size)
    order = np.lexsort((rel, -values[:, : ids.shape[1]].reshape(-1), q_pos))
    ranked = flat[order].reshape(ids.shape)
    return dict(zip(query_ids, ranked.tolist(), strict=True)), exact


def official_scores(metrics: object, rankings: dict[str, dict[str, dict[int, list[int]]]]) -> dict[str, float]:
    """The package's numbers, as fractions, under our key names: each protocol's functions on that
    protocol's rankings."""
    out: dict[str, float] = {}
    eccv = metrics.eccv_metrics(rankings["eccv"], "all")
    for key in ("map_at_r", "rprecision", "r1"):
        for d in ("i2t", "t2i"):
            out[f"eccv/{d}_{key}"] = float(eccv[f"eccv_{key}"][d])
    for proto, fn in (("cxc", metrics.cxc_recalls), ("coco5k", metrics.coco_5k_recalls),
                      ("coco1k", metrics.coco_1k_recalls)):
        for k in KS:
            score = fn(rankings["coco" if proto.startswith("coco") else proto], "all", K=k)
            out.update({f"{proto}/{d}_r{k}": float(score[d]) for d in ("i2t", "t2i")})
    return out


def official_rankings(scores: torch.Tensor, files: object, image_index: dict[int, int],
                      caption_index: dict[int, int], length: int) -> dict[str, dict[str, dict[int, list[int]]]]:
    """Rankings of the protocol's galleries (its images, the captions of ``coco_test_ids``) for
    every query of each protocol, ties broken against that protocol's query, each as long as
    what the package reads of it needs (asserted exact): 10 items, R for ECCV, and for COCO 1K
    the query's first 10 items of its own fold."""
    caption_ids, image_ids = np.array(files.caption_ids), np.array(files.image_ids)
    i2t_scores = scores[torch.tensor([image_index[i] for i in files.image_ids])][
        :, torch.tensor([caption_index[c] for c in files.caption_ids])]  # (5000, 25000), the package's orders
    t2i_scores = i2t_scores.T.contiguous()
    image_at = {i: n for n, i in enumerate(files.image_ids)}
    caption_at = {c: n for n, c in enumerate(files.caption_ids)}
    step = len(files.caption_ids) // 5
    fold = {"t2i": {c: n // step for n, c in enumerate(files.caption_ids)}}  # query -> fold, per direction
    fold["i2t"] = {files.positives["coco5k/t2i"][c][0]: f for c, f in fold["t2i"].items()}
    item_fold = {"i2t": fold["t2i"], "t2i": fold["i2t"]}
    out = {}
    for proto, name in (("coco", "coco5k"), ("cxc", "cxc"), ("eccv", "eccv")):
        out[proto] = {}
        for d, block, at, ids in (("i2t", i2t_scores, image_at, caption_ids), ("t2i", t2i_scores, caption_at, image_ids)):
            table = files.positives[f"{name}/{d}"]
            queries = list(table)
            rows = block[torch.tensor([at[q] for q in queries])]
            lists, exact = ranked_lists(rows, queries, ids, table, length)
            need = {q: max(len(table[q]) if proto == "eccv" else 10, 1) for q in queries}
            if proto == "coco":  # COCO 1K reads up to the 10th item of the query's fold
                for q in queries:
                    hits = np.flatnonzero([item_fold[d][i] == fold[d][q] for i in lists[q]])
                    need[q] = int(hits[9]) + 1 if len(hits) >= 10 else length + 1
            short = [n for n, q in enumerate(queries) if need[q] > exact[n]]
            if short:  # rank those queries in full
                full, _ = ranked_lists(rows[short], [queries[n] for n in short], ids, table, rows.shape[1])
                lists.update(full)
            out[proto][d] = lists
    return out


# ------------------------------------------------------------------------------- our side
def coco5k_split(files: object, seed: int = 0, dim: int = 64, noise: float = 0.3
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, int], dict[int, int]]:
    """A COCO 5K test split in COCO's ids: the package's 5,000 images and 25,000 captions in a
    shuffled order, plus 10 captions outside the protocol (Karpathy's split has 25,010).

    Features with structure: a caption is its image, plus every image the protocol's files list
    it as a positive of (CxC, ECCV), plus noise; so every metric is far from 0 and 1.
    """
    gen = torch.Generator().manual_seed(seed)
    image_ids = [files.image_ids[i] for i in torch.randperm(len(files.image_ids), generator=gen).tolist()]
    caption_ids = [files.caption_ids[i] for i in torch.randperm(len(files.caption_ids), generator=gen).tolist()]
    image_index = {c: i for i, c in enumerate(image_ids)}
    caption_index = {c: j for j, c in enumerate(caption_ids)}
    owner = files.positives["coco5k/t2i"]
    extra = torch.randint(len(image_ids), (10,), generator=gen)
    text_to_image = torch.cat([torch.tensor([image_index[owner[c][0]] for c in caption_ids]), extra])
    images, texts = BENCH_EVAL.protocol_features(files, image_index, caption_index, text_to_image, dim, noise, gen)
    return images, texts, text_to_image, image_index, caption_index


@pytest.fixture(scope="module")
def package_files():
    return read_eccv_files(eccv_directory(None))


def test_package_files_are_what_the_docs_say(package_files) -> None:
    p = package_files.positives
    assert len(package_files.image_ids) == 5000 and len(package_files.caption_ids) == 25000
    assert (len(p["eccv/i2t"]), len(p["eccv/t2i"])) == (1261, 1332)
    assert (len(p["cxc/i2t"]), len(p["cxc/t2i"])) == (5000, 24972)
    assert (len(p["coco5k/i2t"]), len(p["coco5k/t2i"])) == (5000, 25000)


@pytest.mark.slow
def test_coco5k_metrics_equal_the_official_package(package_files) -> None:
    """Every metric of protocol=eccv on a COCO-5K-sized split (5,000 x 25,010) equals the
    eccv_caption package's functions on the rankings of the same scores, to 1e-9."""
    files = package_files
    images, texts, text_to_image, image_index, caption_index = coco5k_split(files)
    protocol = build_eccv_protocol(files, image_index, caption_index)
    scores = images @ texts.T  # what retrieval_scores computes too (one chunk)
    ours = retrieval_scores(images, texts, text_to_image, protocol=protocol)  # one pass, reusing the ranks
    alone = protocol_scores(scores, protocol)  # no reuse: every query counted
    chunked = retrieval_scores(images, texts, text_to_image, chunk_size=1200, protocol=protocol)

    rankings = official_rankings(scores, files, image_index, caption_index, length=100)
    official = official_scores(eccv_caption.Metrics(), rankings)

    assert set(official) == {k for k in ours if "/" in k}
    diffs = {k: abs(ours[k] / 100 - v) for k, v in official.items()}
    print("\nmax abs difference against eccv_caption (fractions), value:")
    for k in sorted(diffs):
        print(f"  {k:24} {diffs[k]:.1e}  {official[k]:.4f}")
    assert max(diffs.values()) <= 1e-9
    assert all(0.02 < v < 0.99 for v in official.values())  # far from 0 and 1
    for other in (alone, chunked):
        assert max(abs(ours[k] - other[k]) for k in official) <= 1e-9


# ------------------------------------------------------------------------ small, with ties
def write_protocol_files(directory: Path, n_images: int = 10, seed: int = 0) -> dict[str, object]:
    """A miniature of the package's files: ``n_images`` images (COCO ids 1000 + i) with five
    captions each (ids 5000 + 5 i + k), folds of n_images / 5 images; CxC lists some extra captions
    and images, ECCV some queries with more."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    images = [1000 + i for i in range(n_images)]
    captions = {im: [5000 + 5 * i + k for k in range(5)] for i, im in enumerate(images)}
    owner = {c: im for im, cs in captions.items() for c in cs}
    all_caps = [c for im in images for c in captions[im]]
    tables = {"original": ({im: captions[im] for im in images}, {c: [owner[c]] for c in all_caps})}
    cxc_i2t = {im: captions[im] + [int(c) for c in rng.choice(all_caps, 2, replace=False) if c not in captions[im]]
               for im in images}
    cxc_t2i = {c: sorted({owner[c], *map(int, rng.choice(images, int(rng.integers(0, 3))))}) for c in all_caps}
    tables["cxc"] = (cxc_i2t, cxc_t2i)
    eccv_i2t = {im: sorted(set(captions[im][:4]) | {int(c) for c in rng.choice(all_caps, 6, replace=False)}
                           | ({999999} if n % 3 == 0 else set()))  # an id outside the captions: counts in R
                for n, im in enumerate(images[::2])}
    eccv_t2i = {c: sorted({owner[c], *map(int, rng.choice(images, 3, replace=False))}) for c in all_caps[::3]}
    tables["eccv"] = (eccv_i2t, eccv_t2i)
    for stem, (i2t, t2i) in tables.items():
        (directory / f"{stem}_image_to_caption.json").write_text(json.dumps({str(k): v for k, v in i2t.items()}))
        (directory / f"{stem}_caption_to_image.json").write_text(json.dumps({str(k): v for k, v in t2i.items()}))
    np.save(directory / "coco_test_ids.npy", np.array(all_caps, dtype=np.int64))
    return {"images": images, "captions": captions, "owner": owner, "all_caps": all_caps}


def official_metrics_for(directory: Path) -> object:
    """eccv_caption.Metrics reading the miniature files instead of its own."""
    m = eccv_caption.Metrics()
    m.set_coco_gts(directory / "original_image_to_caption.json", directory / "original_caption_to_image.json")
    m.set_cxc_gts(directory / "cxc_image_to_caption.json", directory / "cxc_caption_to_image.json")
    m.set_eccv_gts(directory / "eccv_image_to_caption.json", directory / "eccv_caption_to_image.json")
    m.coco_ids = np.load(directory / "coco_test_ids.npy")
    return m


def full_rankings(scores: torch.Tensor, files: object, image_index: dict[int, int],
                  caption_index: dict[int, int]) -> dict[str, dict[str, dict[int, list[int]]]]:
    """Complete rankings (every gallery item) of every protocol's queries, ties against the query."""
    caption_ids, image_ids = np.array(files.caption_ids), np.array(files.image_ids)
    i2t_scores = scores[torch.tensor([image_index[i] for i in image_ids])][
        :, torch.tensor([caption_index[c] for c in caption_ids])]
    out = {}
    for proto, name in (("coco", "coco5k"), ("cxc", "cxc"), ("eccv", "eccv")):
        lists = {}
        for d, block, ids, q_ids in (("i2t", i2t_scores, caption_ids, files.image_ids),
                                     ("t2i", i2t_scores.T, image_ids, files.caption_ids)):
            table = files.positives[f"{name}/{d}"]
            keys = list(table)
            block = block[torch.tensor([q_ids.index(q) for q in keys])]
            lists[d], _ = ranked_lists(block, keys, ids, table, block.shape[1])
        out[proto] = lists
    return out


@pytest.mark.parametrize("slack", [protocols.TOP_SLACK, 0])
def test_ties_count_against_the_query_as_the_package_ranks_them(tmp_path: Path, monkeypatch, slack: int) -> None:
    """Scores on a few levels (many exact ties, also at the end of ECCV's short top lists):
    equal to the package on rankings that put non-positives first at equal scores."""
    monkeypatch.setattr(protocols, "TOP_SLACK", slack)
    meta = write_protocol_files(tmp_path / "files")
    files = read_eccv_files(tmp_path / "files")
    gen = torch.Generator().manual_seed(1)
    image_index = {im: i for i, im in enumerate(meta["images"])}
    caption_index = {c: j for j, c in enumerate(meta["all_caps"])}
    n_img, n_txt = len(image_index), len(caption_index)
    scores = (torch.rand(n_img, n_txt, generator=gen) * 4).floor() / 4  # 4 levels
    own = torch.tensor([image_index[meta["owner"][c]] for c in meta["all_caps"]])
    scores[own, torch.arange(n_txt)] += 0.25 * (torch.rand(n_txt, generator=gen) > 0.5)
    protocol = build_eccv_protocol(files, image_index, caption_index)
    ours = protocol_scores(scores, protocol)
    official = official_scores(official_metrics_for(tmp_path / "files"),
                               full_rankings(scores, files, image_index, caption_index))
    assert max(abs(ours[k] / 100 - v) for k, v in official.items()) <= 1e-12
    assert len({round(v, 6) for v in official.values()}) > 5  # not all 0 or 1


@pytest.mark.parametrize("n_queries", [3, 40])
def test_column_counts_gathered_or_in_place(n_queries: int) -> None:
    """A few caption columns are gathered before counting, many are counted in place over all of
    S: both give each column's count of scores at or above its threshold (ties included)."""
    gen = torch.Generator().manual_seed(0)
    scores = (torch.rand(30, 100, generator=gen) * 8).floor()  # 8 levels: many ties
    cols = torch.randperm(100, generator=gen)[:n_queries]
    thresh = (torch.rand(n_queries, generator=gen) * 8).floor()
    gathered = protocols.COL_GATHER_SHARE * n_queries < scores.shape[1]
    assert gathered == (n_queries == 3)  # the two cases take the two paths
    expected = torch.tensor([int((scores[:, c] >= t).sum()) for c, t in zip(cols.tolist(), thresh.tolist(), strict=True)])
    assert torch.equal(protocols._col_counts(scores, cols, thresh), expected)
    assert len(set(expected.tolist())) > 2  # counts that differ from column to column


def test_reusing_the_ranks_changes_nothing(tmp_path: Path) -> None:
    """retrieval_scores' one pass (reusing S and the ground-truth ranks, a split with captions
    outside the protocol and in another order) = the protocol alone = several chunks."""
    meta = write_protocol_files(tmp_path / "files", n_images=20, seed=3)
    files = read_eccv_files(tmp_path / "files")
    gen = torch.Generator().manual_seed(2)
    order = torch.randperm(len(meta["all_caps"]), generator=gen).tolist()
    caption_index = {meta["all_caps"][o]: j for j, o in enumerate(order)}
    image_index = {im: i for i, im in enumerate(meta["images"])}
    t2i = [image_index[meta["owner"][meta["all_caps"][o]]] for o in order] + [0, 7, 7]  # 3 captions outside
    t2i = torch.tensor(t2i)
    images = F.normalize(torch.randn(len(image_index), 16, generator=gen), dim=1)
    texts = F.normalize(images[t2i] + 0.6 * torch.randn(len(t2i), 16, generator=gen), dim=1)
    protocol = build_eccv_protocol(files, image_index, caption_index)
    one = retrieval_scores(images, texts, t2i, protocol=protocol)
    alone = protocol_scores(images @ texts.T, protocol)
    chunked = retrieval_scores(images, texts, t2i, chunk_size=3, protocol=protocol)
    assert {k: v for k, v in one.items() if "/" in k} == alone
    assert max(abs(chunked[k] - v) for k, v in alone.items()) <= 1e-9
    plain = retrieval_scores(images, texts, t2i)
    assert {k: v for k, v in one.items() if "/" not in k} == plain  # our own metrics are untouched


def test_unmapped_captions_are_counted_and_a_missing_image_is_an_error(tmp_path: Path) -> None:
    meta = write_protocol_files(tmp_path / "files")
    files = read_eccv_files(tmp_path / "files")
    image_index = {im: i for i, im in enumerate(meta["images"])}
    caption_index = {c: j for j, c in enumerate(meta["all_caps"][:-3])}  # the last 3 captions unmapped
    protocol = build_eccv_protocol(files, image_index, caption_index)
    assert protocol.captions.numel() == len(meta["all_caps"]) - 3
    assert protocol.query_sets["coco5k/t2i"].queries.numel() == len(meta["all_caps"]) - 3
    assert any("3 of the protocol's caption ids have no caption in the split" in n for n in protocol.notes)
    del image_index[meta["images"][4]]
    with pytest.raises(FNEError, match=r"data.protocol=eccv: the split holds 9 of the 10 COCO 5K test images"):
        build_eccv_protocol(files, image_index, caption_index)


def test_missing_files_name_the_key(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FNEError, match=r"data.protocol_dir='.*nowhere': original_image_to_caption.json not found"):
        eccv_directory(str(tmp_path / "nowhere"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FNEError, match=r"data.protocol_dir=null: .*pip install eccv-caption"):
        eccv_directory(None)
    write_protocol_files(tmp_path / "files")
    (tmp_path / "files" / "cxc_caption_to_image.json").write_text("[1, 2]")
    with pytest.raises(FNEError, match=r"cxc_caption_to_image.json: expected a JSON object"):
        read_eccv_files(tmp_path / "files")
    assert len(ECCV_FILES) == 7


# ------------------------------------------------------------ the entry points, end to end
def write_coco(root: Path, meta: dict[str, object], size: int = 40) -> None:
    """A miniature COCO: Karpathy's dataset_coco.json (test split = the protocol's images, one
    image with a 6th caption; 6 train and 2 val images), COCO's captions_val2014.json and the images."""
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    words = ["red", "blue", "green", "small", "large", "dog", "cat", "car", "tree", "house", "on", "a", "the"]
    images, annotations, sentid = [], [], 0
    extra_ids = {2000 + n: "train" if n < 6 else "val" for n in range(8)}
    for n, cocoid in enumerate(meta["images"] + list(extra_ids)):
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "val2014" / name)
        caps = meta["captions"].get(cocoid, [900000 + 10 * n + k for k in range(5)])
        caps = caps + ([990000] if n == 3 else [])  # a 6th caption, not in the protocol
        sentences = []
        for capid in caps:
            raw = " ".join(rng.choice(words, 6)) + f" number {capid}"
            annotations.append({"id": capid, "image_id": cocoid, "caption": raw})
            sentences.append({"raw": raw, "sentid": sentid, "imgid": n})
            sentid += 1
        images.append({"imgid": n, "cocoid": cocoid, "split": extra_ids.get(cocoid, "test"),
                       "filepath": "val2014", "filename": name, "sentences": sentences})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, write_protocol_files(root / "eccv_files"))
    return root


def coco_overrides(root: Path) -> list[str]:
    return ["data=coco", f"data.root={root}", f"data.protocol_dir={root / 'eccv_files'}", "data.num_workers=0",
            "data.pin_memory=false", "data.eval_batch_size=8"]


def test_evaluate_reports_the_protocol_of_the_saved_embeddings(tiny_coco: Path, tmp_path: Path) -> None:
    cfg = compose_task("evaluate", ["model=tiny", *coco_overrides(tiny_coco), "protocol=eccv", "save_embeddings=true"],
                       tmp_path)
    metrics = evaluate(cfg)
    emb = np.load(tmp_path / "embeddings.npz")
    split = instantiate(cfg.data).load_split("test")
    protocol = load_protocol("eccv", split, str(tiny_coco / "dataset_coco.json"),
                             str(tiny_coco / "annotations" / "captions_val2014.json"), str(tiny_coco / "eccv_files"))
    scores = torch.from_numpy(emb["image_features"]) @ torch.from_numpy(emb["text_features"]).T
    expected = protocol_scores(scores, protocol)
    assert len(expected) == 24
    assert {f"test_{k}": v for k, v in expected.items()} == {k: v for k, v in metrics.items() if k.startswith(
        ("test_eccv/", "test_cxc/", "test_coco5k/", "test_coco1k/"))}
    md = (tmp_path / "metrics.md").read_text()
    assert "## Published protocols (eccv_caption)" in md and "| ECCV Caption i2t |" in md
    assert "0 images and 1 captions of the split are not among the protocol's" in md


def test_protocol_bad_input_is_one_error_line(tiny_coco: Path, tmp_path: Path) -> None:
    base = ["model=tiny", *coco_overrides(tiny_coco)]
    with pytest.raises(FNEError, match=r"protocol=eccv: the protocol scores the COCO 5K test split; got split=val"):
        evaluate(compose_task("evaluate", [*base, "protocol=eccv", "split=val"], tmp_path))
    with pytest.raises(FNEError, match=r"data.coco_captions='.*missing.json': annotation file not found"):
        evaluate(compose_task("evaluate", [*base, "protocol=eccv", f"data.coco_captions={tmp_path / 'missing.json'}"],
                              tmp_path))
    with pytest.raises(FNEError, match=r"protocol='cxc': expected null or eccv"):
        evaluate(compose_task("evaluate", [*base, "protocol=cxc"], tmp_path))
    proc = run_entry_point("evaluate", *base, "data.protocol=eccv", f"data.protocol_dir={tmp_path / 'none'}",
                           f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: data.protocol_dir=")


@pytest.mark.slow
def test_training_reports_the_protocol_evaluate_reports(tiny_coco: Path, cache_dir: Path, tmp_path: Path) -> None:
    from fne_lightning.train import train

    from conftest import TINY_OVERRIDES, compose_config

    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.num_")] + [
        *coco_overrides(tiny_coco), "data.protocol=eccv", "data.batch_size=8", "data.augment.randaugment=null",
        "trainer.max_epochs=1"]
    cfg = compose_config(overrides, cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "train")
    trained = train(cfg)
    keys = {k for k in trained if k.startswith(("test_eccv/", "test_cxc/", "test_coco5k/", "test_coco1k/"))}
    assert len(keys) == 24
    ckpt = tmp_path / "train" / "checkpoints" / "best.ckpt"
    metrics = evaluate(compose_task("evaluate", [f"ckpt_path={ckpt}"], tmp_path / "eval"))
    # Lightning logs float32: compare at that precision.
    assert {k: np.float32(metrics[k]) for k in keys} == {k: np.float32(trained[k]) for k in keys}


# ----------------------------------------------------------------------- zero-shot: clip_benchmark
@pytest.mark.slow
def test_zero_shot_recall_equals_clip_benchmark(tmp_path: Path) -> None:
    """Our zero-shot R@K of an open_clip model equals clip_benchmark's zero-shot retrieval of the
    same weights on the same images and captions (run as its CLI runs it: load_clip, model.eval(),
    the mscoco_captions dataset with open_clip's own transform, --no_amp).

    The inputs are chosen where the two pipelines feed the model the same tensors: square images
    (our resize to size x size equals open_clip's shorter-side resize and centre crop) and
    captions our cleaning leaves as they are (lower case, no punctuation, under 30 words).
    """
    pytest.importorskip("clip_benchmark")
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval
    from clip_benchmark.models import load_clip
    from torch.utils.data import DataLoader

    import fne_lightning.models.encoders  # noqa: F401  (registers fne-tiny with open_clip)

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "val2014").mkdir(parents=True)
    words = ["red", "blue", "green", "yellow", "small", "large", "dog", "cat", "car", "tree", "house", "on", "a"]
    karpathy, coco_images, coco_captions, sentid = [], [], [], 0
    for i in range(24):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((48, 48), Image.NEAREST).save(
            root / "val2014" / name)
        captions = [" ".join(rng.choice(words, int(rng.integers(4, 9)))) for _ in range(int(rng.integers(3, 6)))]
        karpathy.append({"imgid": i, "split": "test", "filepath": "val2014", "filename": name,
                         "sentences": [{"raw": c, "sentid": sentid + k} for k, c in enumerate(captions)]})
        coco_images.append({"id": i, "file_name": name})
        coco_captions += [{"id": sentid + k, "image_id": i, "caption": c} for k, c in enumerate(captions)]
        sentid += len(captions)
    (root / "dataset.json").write_text(json.dumps({"images": karpathy}))
    (root / "coco_test.json").write_text(json.dumps({"images": coco_images, "annotations": coco_captions}))
    torch.manual_seed(0)
    weights = tmp_path / "fne-tiny.pt"
    torch.save(open_clip.create_model("fne-tiny").state_dict(), weights)

    ours = evaluate(compose_task("evaluate", [
        "model=tiny", f"model.pretrained={weights}", "data=karpathy", f"data.root={root}",
        f"data.annotations={root / 'dataset.json'}", "data.num_workers=0", "data.pin_memory=false", "device=cpu",
        "precision=fp32"], tmp_path / "eval"))

    model, transform, tokenizer = load_clip("open_clip", "fne-tiny", str(weights), cache_dir=None, device="cpu")
    model.eval()
    dataset = build_dataset("mscoco_captions", root=str(root), transform=transform, split="test",
                            annotation_file=str(root / "coco_test.json"), task="zeroshot_retrieval")
    loader = DataLoader(dataset, batch_size=7, shuffle=False, num_workers=0,
                        collate_fn=get_dataset_collate_fn("mscoco_captions"))
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=list(KS))
    for k in KS:  # clip_benchmark's image retrieval is our text-to-image direction
        assert abs(theirs[f"image_retrieval_recall@{k}"] - ours[f"test/t2i_r{k}"] / 100) <= 1e-6
        assert abs(theirs[f"text_retrieval_recall@{k}"] - ours[f"test/i2t_r{k}"] / 100) <= 1e-6
    assert 0 < ours["test/t2i_r10"] < 100 and 0 < ours["test/i2t_r5"] < 100
