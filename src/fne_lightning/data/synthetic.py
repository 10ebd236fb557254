"""Built-in synthetic image-text retrieval benchmark with false negatives by construction.

Each image is a procedurally rendered scene (PIL, 64 px PNG by default): one or two objects,
each with a shape, a colour, a size and a position, on a plain, striped or dotted background
that has its own colour. Each image gets five captions from varied templates. Like human
captions of real photos, some are detailed ("a large red circle on the left, on a striped grey
background") and many mention only SOME attributes ("a red circle", "a small star at the top",
"a blue square and a yellow triangle"). A partial caption is true of every image that has what
it states, so one caption truly describes many images: the "negatives" that contrastive
training pushes away include real matches, i.e. false negatives exist by construction, as in
Flickr30K/COCO (ECCV Caption, CxC), but here they are known exactly.

Every sentence stores its structured ``meaning`` (the attributes, relation, count and background
it states) and every image its ``scene``; ``<json stem>.positives.json`` (FNE_SPEC section 10) lists
for each image every sentence of the SAME split that describes it, computed vectorised from
those structures. Only same-split pairs are listed: evaluation and training diagnostics only ever
compare within a split, and cross-split lists would make the file several times larger.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fne_lightning.data.captions import clean_caption
from fne_lightning.errors import FNEError, check

FORMAT_VERSION = 1  # bump whenever scenes, captions or files change, so old caches are not reused
JSON_NAME = "dataset_synthetic.json"
POSITIVES_NAME = "dataset_synthetic.positives.json"
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (245, 215, 30),
           "purple": (140, 50, 170), "orange": (245, 140, 20), "cyan": (40, 200, 215)}
SIZES = {"small": 0.11, "large": 0.2}  # radius as a fraction of the image side
# Centres as fractions of the side. Two-object scenes use left+right or top+bottom, so two large
# objects (radius 0.2, jitter 0.03) never overlap and "left of"/"above" follow from the positions.
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "centre": (0.5, 0.5)}
BG_KINDS = ("plain", "striped", "dotted")
BG_COLOURS = {"black": ((20, 20, 20), (62, 62, 62)), "grey": ((128, 128, 128), (104, 104, 104)),
              "white": ((238, 238, 238), (204, 204, 204))}  # (base, pattern): patterns stay subtle
_OBJECT_KEYS = ("shape", "colour", "size", "position")
_ATTR_VALUES = (SHAPES, tuple(COLOURS), tuple(SIZES), tuple(POSITIONS))
_RELATIONS = (None, "left_of", "above")  # objects[0] is left of / above objects[1]
_SUPERSAMPLE = 4  # draw large, then box-filter down: anti-aliased edges without extra dependencies


def _ring(n: int, radii: tuple[float, ...], start: float = -90.0) -> list[tuple[float, float]]:
    """``n`` vertices around the origin at angles from ``start`` (degrees), cycling through ``radii``."""
    return [(radii[i % len(radii)] * math.cos(math.radians(start + 360.0 * i / n)),
             radii[i % len(radii)] * math.sin(math.radians(start + 360.0 * i / n))) for i in range(n)]


_W = 0.32  # half-width of a cross arm
# Unit polygons (circumradius about 1, y pointing down), scaled so shapes of one size look alike.
_POLYGONS = {"square": _ring(4, (1.13,), 45.0), "triangle": _ring(3, (1.1,)), "star": _ring(10, (1.05, 0.45)),
             "hexagon": _ring(6, (1.0,), 0.0), "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
             "cross": [(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1), (-_W, _W),
                       (-1, _W), (-1, -_W), (-_W, -_W)]}


def _pick(rng: np.random.Generator, options: Any) -> Any:
    """A uniformly chosen element of a sequence, as its own Python type (not a numpy scalar)."""
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one scene: 1 or 2 objects (never the same shape AND colour) and a background.

    Args:
        rng: the generator to draw from.

    Returns:
        ``{"objects": [...], "background": {...}}``: each object's shape, colour, size,
        position, centre and angle, and the background's kind, colour (and pattern), as stored
        in the JSON.
    """
    n = 1 + int(rng.integers(2))
    positions = [_pick(rng, tuple(POSITIONS))] if n == 1 else list(_pick(rng, (("left", "right"), ("top", "bottom"))))
    rng.shuffle(positions)
    objects: list[dict[str, Any]] = []
    for position in positions:
        while True:
            shape, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
            if not any(o["shape"] == shape and o["colour"] == colour for o in objects):
                break
        cx, cy = POSITIONS[position]
        # Rounded so the stored scene re-renders to exactly the same pixels.
        objects.append({"shape": shape, "colour": colour, "size": _pick(rng, tuple(SIZES)), "position": position,
                        "x": round(cx + rng.uniform(-0.03, 0.03), 3), "y": round(cy + rng.uniform(-0.03, 0.03), 3),
                        "angle": round(rng.uniform(-12.0, 12.0), 1) + 0.0})  # + 0.0: no "-0.0"
    background = {"kind": _pick(rng, BG_KINDS), "colour": _pick(rng, tuple(BG_COLOURS))}
    if background["kind"] != "plain":
        background.update(period=round(rng.uniform(0.1, 0.18), 3), phase=round(rng.uniform(0.0, 1.0), 3))
        if background["kind"] == "striped":
            background["orientation"] = _pick(rng, ("horizontal", "vertical", "diagonal"))
    return {"objects": objects, "background": background}


def render_scene(scene: dict[str, Any], image_size: int) -> Image.Image:
    """Draw a scene as an RGB image, anti-aliased.

    Args:
        scene: a scene of :func:`sample_scene`, as stored in the JSON.
        image_size: the side in pixels.
    """
    side = image_size * _SUPERSAMPLE
    bg = scene["background"]
    base, pattern = BG_COLOURS[bg["colour"]]
    img = Image.new("RGB", (side, side), base)
    draw = ImageDraw.Draw(img)
    if bg["kind"] != "plain":
        period = bg["period"] * side
        offsets = np.arange((bg["phase"] - 1.0) * period, 2 * side, period).tolist()  # diagonals need 2 * side
        for c in offsets:
            if bg["kind"] == "dotted":
                for y in (y for y in offsets if c < side + period and y < side + period):
                    draw.ellipse([c - 0.2 * period, y - 0.2 * period, c + 0.2 * period, y + 0.2 * period], fill=pattern)
            elif bg["orientation"] == "horizontal":
                draw.rectangle([0, c, side, c + period / 2], fill=pattern)
            elif bg["orientation"] == "vertical":
                draw.rectangle([c, 0, c + period / 2, side], fill=pattern)
            else:  # a band between the diagonals x + y = c and x + y = c + period / 2
                draw.polygon([(c, 0), (c + period / 2, 0), (c + period / 2 - side, side), (c - side, side)], fill=pattern)
    for obj in scene["objects"]:
        cx, cy, r, fill = obj["x"] * side, obj["y"] * side, SIZES[obj["size"]] * side, COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            continue
        cos, sin = math.cos(math.radians(obj["angle"])), math.sin(math.radians(obj["angle"]))
        draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _POLYGONS[obj["shape"]]],
                     fill=fill)
    return img.reduce(_SUPERSAMPLE)


# ---------------------------------------------------------------------------------------------
# Captions. A meaning is {"objects": [{attr: value, ...}, ...], "relation"?: "left_of"|"above",
# "count"?: 1|2, "background"?: {"kind"?: ..., "colour"?: ...}} and holds only what the text states.
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_SHAPE_WORDS = {s: (s,) for s in SHAPES} | {"circle": ("circle", "disc"), "cross": ("cross", "plus sign")}
_POSITION_WORDS = {"left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
                   "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                   "centre": ("in the centre", "in the middle")}
_RELATION_WORDS = {"left_of": (("to the left of", "left of"), ("to the right of", "right of")),
                   "above": (("above", "over"), ("below", "under", "beneath"))}
_OPENERS = ("", "", "", "", "there is ", "a picture of ", "an image of ")
# (weight, stated object attributes, extra). Weights mix detailed and vague captions; the vaguest
# state two attributes ("a red circle"), which still match only ~3% of images.
_ONE_TEMPLATES = ((3, "colour shape", ""), (2, "size colour shape", ""), (2, "colour shape position", ""),
                  (2, "colour shape", "some background"), (1, "size shape position", ""),
                  (1, "size colour position", ""), (1, "shape", "background"),
                  (2, "size colour shape position", ""), (1, "size colour shape position", "background"),
                  (1, "size colour shape", "count"))
_TWO_TEMPLATES = ((2, "and"), (3, "relation"), (1, "count"), (1, "background"), (1, "same"), (1, "full"))
# False-negative density (``data.fn_density``): the share of captions drawn from the vague
# templates below, which state one attribute of one object, at most with its position ("a red
# shape", "a circle", "a small shape on the left"), and so are true of many more images, as short
# human captions are ("a dog", "people outside"). ``low`` draws none: the benchmark as it was;
# ``very_high`` leaves about one detailed caption of an image's five.
FN_DENSITIES = {"low": 0.0, "medium": 0.25, "high": 0.5, "very_high": 0.8}
_VAGUE_TEMPLATES = ((3, "colour", ""), (3, "shape", ""), (1, "size", ""), (2, "colour", "position"),
                    (2, "shape", "position"), (1, "size", "position"))


def _pick_weighted(rng: np.random.Generator, templates: tuple) -> tuple:
    """A template drawn with probability proportional to its weight (its first element)."""
    weights = np.array([t[0] for t in templates], dtype=float)
    return templates[int(rng.choice(len(templates), p=weights / weights.sum()))]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: dict[str, Any], attrs: tuple[str, ...], rng: np.random.Generator, names: dict[str, str]) -> str:
    """Article-less noun phrase stating ``attrs`` of ``obj``, e.g. "small red circle on the left"."""
    words = [_pick(rng, _SIZE_WORDS[obj["size"]])] if "size" in attrs else []
    words += [obj["colour"]] if "colour" in attrs else []
    words.append(names[obj["shape"]] if "shape" in attrs else _pick(rng, ("shape", "object")))
    words += [_pick(rng, _POSITION_WORDS[obj["position"]])] if "position" in attrs else []
    return " ".join(words)


def _background(bg: dict[str, Any], keys: tuple[str, ...], rng: np.random.Generator) -> tuple[dict, str]:
    words = " ".join(bg[k] for k in ("kind", "colour") if k in keys)
    return {k: bg[k] for k in keys}, f"{_pick(rng, ('on a', 'against a'))} {words} background"


def _plural(word: str) -> str:
    return word + ("es" if word.endswith("s") else "s")


def _vague_caption(scene: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, Any], str]:
    """One vague caption of ``scene``: one attribute of one object, maybe with its position."""
    obj = _pick(rng, scene["objects"])
    _, attr, extra = _pick_weighted(rng, _VAGUE_TEMPLATES)
    keys = (attr, "position") if extra else (attr,)
    noun = _noun(obj, keys, rng, {shape: _pick(rng, words) for shape, words in _SHAPE_WORDS.items()})
    return {"objects": [{k: obj[k] for k in keys}]}, _pick(rng, _OPENERS) + _a(noun)


def make_caption(scene: dict[str, Any], rng: np.random.Generator, fn_density: str = "low") -> tuple[dict[str, Any], str]:
    """One random caption that is true of ``scene``.

    Args:
        scene: a scene of :func:`sample_scene`.
        rng: the generator to draw from.
        fn_density: ``low`` (the original templates), ``medium``, ``high`` or ``very_high``: that share
            (:data:`FN_DENSITIES`) of the captions is vague, true of many images.

    Returns:
        ``(meaning, text)``: the attributes, relation, count and background the caption states,
        and its text, without capital or full stop.
    """
    # `low` draws nothing here, so its captions (and the cached benchmark) are unchanged.
    if fn_density != "low" and rng.random() < FN_DENSITIES[fn_density]:
        return _vague_caption(scene, rng)
    objs, bg = scene["objects"], scene["background"]
    meaning: dict[str, Any] = {}
    # One word per shape per caption: "an orange cross and a green plus sign" would read as two shapes.
    names = {shape: _pick(rng, words) for shape, words in _SHAPE_WORDS.items()}
    kind = "one"
    if len(objs) == 2 and rng.random() < 0.7:  # else mention only one object, as people often do
        kind = _pick_weighted(rng, _TWO_TEMPLATES)[1]
    a = _pick(rng, objs)  # the object mentioned first (or only)
    b = objs[-1] if a is objs[0] else objs[0]
    if kind == "same" and (a["shape"] == b["shape"] or a["colour"] == b["colour"]):
        same = "shape" if a["shape"] == b["shape"] else "colour"
        meaning["objects"] = [{same: a[same]}, {same: b[same]}]
        meaning["count"] = 2
        if same == "shape":
            text = f"two {_plural(names[a['shape']])}"
        else:
            text = f"two {a['colour']} {_pick(rng, ('shapes', 'objects'))}"
    elif kind in ("relation", "full"):
        first, second = sorted(objs, key=lambda o: o["position"] not in ("left", "top"))
        relation = "left_of" if first["position"] == "left" else "above"
        attrs = [("size", "colour", "shape")] * 2 if kind == "full" else [
            _pick(rng, (("colour", "shape"), ("shape",), ("size", "colour", "shape"), ("size", "shape")))
            for _ in range(2)]
        meaning["objects"] = [{k: first[k] for k in attrs[0]}, {k: second[k] for k in attrs[1]}]
        meaning["relation"] = relation
        forward, backward = _RELATION_WORDS[relation]
        first_np, second_np = _a(_noun(first, attrs[0], rng, names)), _a(_noun(second, attrs[1], rng, names))
        if rng.random() < 0.5:
            text = f"{first_np} {_pick(rng, forward)} {second_np}"
        else:
            text = f"{second_np} {_pick(rng, backward)} {first_np}"
        if kind == "full":
            meaning["background"], phrase = _background(bg, ("kind", "colour"), rng)
            text += f", {phrase}"
    elif kind != "one":  # "and", "count", "background" (and "same" when nothing is shared)
        # Bare shapes ("a circle and a square") only with a background, else too vague.
        attrs = {"count": ("size", "colour", "shape"), "background": _pick(rng, (("colour", "shape"), ("shape",)))
                 }.get(kind, ("colour", "shape"))
        meaning["objects"] = [{k: o[k] for k in attrs} for o in (a, b)]
        text = f"{_a(_noun(a, attrs, rng, names))} and {_a(_noun(b, attrs, rng, names))}"
        if kind == "count":
            meaning["count"] = 2
            text = f"{_pick(rng, ('two shapes', 'two objects'))}, {text}"
        if kind == "background":
            keys = _pick(rng, (("kind",), ("colour",), ("kind", "colour")))
            meaning["background"], phrase = _background(bg, keys, rng)
            text += f" {phrase}"
    else:
        templates = _ONE_TEMPLATES if len(objs) == 1 else _ONE_TEMPLATES[:-1]  # a count would be false
        _, attr_text, extra = _pick_weighted(rng, templates)
        attrs = tuple(attr_text.split())
        meaning["objects"] = [{k: a[k] for k in attrs}]
        noun = _noun(a, attrs, rng, names)
        if extra == "count":
            meaning["count"] = 1
            text = f"{_pick(rng, ('a single', 'just one', 'only one'))} {noun}"
        else:
            text = _pick(rng, _OPENERS) + _a(noun)
        if extra:
            keys = ("kind", "colour") if extra == "background" else _pick(rng, (("kind",), ("colour",), ("kind", "colour")))
            meaning["background"], phrase = _background(bg, keys, rng)
            text += f", {phrase}" if "position" in attrs else f" {phrase}"
    return meaning, text


def make_captions(scene: dict[str, Any], rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE,
                  fn_density: str = "low") -> list[tuple[dict, str]]:
    """``n`` true captions of ``scene`` with distinct meanings (no near-duplicate captions).

    Args:
        scene: a scene of :func:`sample_scene`.
        rng: the generator to draw from.
        n: the number of captions.
        fn_density: ``low``, ``medium``, ``high`` or ``very_high`` (:func:`make_caption`).

    Returns:
        ``n`` pairs ``(meaning, text)``, each text a sentence (capital, full stop).
    """
    captions: dict[str, tuple[dict, str]] = {}
    while len(captions) < n:
        meaning, text = make_caption(scene, rng, fn_density)
        # Without a relation the object order carries no meaning: "A and B" duplicates "B and A".
        objects = meaning["objects"] if "relation" in meaning else sorted(meaning["objects"], key=json.dumps)
        key = json.dumps({**meaning, "objects": objects}, sort_keys=True)
        captions.setdefault(key, (meaning, text[0].upper() + text[1:] + "."))
    return list(captions.values())


def _codes(items: list[dict[str, Any]], keys: tuple[str, ...], values: tuple[tuple, ...]) -> np.ndarray:
    """Mixed-radix code per item: each attribute as value index + 1, 0 when absent."""
    code = np.zeros(len(items), dtype=np.int64)
    for key, vals in zip(keys, values, strict=True):
        code = code * (len(vals) + 1) + np.array([vals.index(it[key]) + 1 if it and key in it else 0 for it in items])
    return code


def _table(keys: tuple[str, ...], values: tuple[tuple, ...]) -> np.ndarray:
    """table[pattern, item] = the pattern (0 = any) agrees with the item, which has every key."""
    grids = np.meshgrid(*[np.arange(len(v) + 1) for v in values], indexing="ij")
    digits = np.stack([g.ravel() for g in grids], 1)  # (codes, keys): digits of every code
    ok = ((digits[:, None, :] == 0) | (digits[:, None, :] == digits[None, :, :])).all(-1)
    return ok & (digits > 0).all(-1)[None, :]  # an absent item (some digit 0) matches nothing


def match_matrix(scenes: list[dict[str, Any]], meanings: list[dict[str, Any]], chunk: int = 256) -> np.ndarray:
    """Which captions are true of which scenes: the positives of the synthetic benchmark.

    A caption is true of a scene when every attribute, relation, count and background stated in
    its meaning holds there. Vectorised (``tests/test_synthetic.py`` checks it against a plain
    per-pair oracle).

    Args:
        scenes: scenes of :func:`sample_scene`.
        meanings: caption meanings of :func:`make_caption`.
        chunk: scenes compared at once (bounds the temporaries).

    Returns:
        A bool array of shape (len(scenes), len(meanings)).
    """
    bg_keys, bg_values = ("kind", "colour"), (BG_KINDS, tuple(BG_COLOURS))
    obj_table, bg_table = _table(_OBJECT_KEYS, _ATTR_VALUES), _table(bg_keys, bg_values)
    image_objs = [_codes([s["objects"][k] if k < len(s["objects"]) else {} for s in scenes], _OBJECT_KEYS, _ATTR_VALUES)
                  for k in range(2)]  # (N,) per slot; a missing second object gets code 0
    image_bg = _codes([s["background"] for s in scenes], bg_keys, bg_values)
    num_objs = np.array([len(s["objects"]) for s in scenes])
    pos = [[s["objects"][k]["position"] if k < len(s["objects"]) else "" for s in scenes] for k in range(2)]
    pos = np.array(pos).T  # (N, 2)
    # relation_ok[order][n, r]: relation r holds with caption objects (0, 1) on image slots order.
    relation_ok = [np.stack([np.ones(len(scenes), bool), (pos[:, i] == "left") & (pos[:, j] == "right"),
                             (pos[:, i] == "top") & (pos[:, j] == "bottom")], 1) for i, j in ((0, 1), (1, 0))]
    cap_objs = [_codes([m["objects"][a] if a < len(m["objects"]) else {} for m in meanings], _OBJECT_KEYS, _ATTR_VALUES)
                for a in range(2)]
    cap_n = np.array([len(m["objects"]) for m in meanings])
    cap_bg = _codes([m.get("background", {}) for m in meanings], bg_keys, bg_values)
    cap_count = np.array([m.get("count", 0) for m in meanings])
    cap_rel = np.array([_RELATIONS.index(m.get("relation")) for m in meanings])
    out = np.empty((len(scenes), len(meanings)), dtype=bool)
    for start in range(0, len(scenes), chunk):  # chunks keep the (chunk, M) temporaries small
        sl = slice(start, start + chunk)
        m = [[obj_table[cap_objs[a][None, :], image_objs[k][sl, None]] for k in range(2)] for a in range(2)]
        single = m[0][0] | m[0][1]
        pair = (m[0][0] & m[1][1] & relation_ok[0][sl][:, cap_rel]) | (m[0][1] & m[1][0] & relation_ok[1][sl][:, cap_rel])
        ok = np.where(cap_n[None, :] == 1, single, pair)
        ok &= bg_table[cap_bg[None, :], image_bg[sl, None]]
        out[sl] = ok & ((cap_count[None, :] == 0) | (cap_count[None, :] == num_objs[sl, None]))
    return out


def _write_dataset(out: Path, sizes: tuple[int, int, int], image_size: int, seed: int, fn_density: str = "low") -> None:
    rng = np.random.Generator(np.random.PCG64(seed))
    (out / "images").mkdir(parents=True)
    images: list[dict[str, Any]] = []
    positives: dict[str, list[int]] = {}
    for split, count in zip(SPLITS, sizes, strict=True):
        first = len(images)
        for _ in range(count):
            imgid, scene = len(images), sample_scene(rng)
            filename = f"{imgid:06d}.png"
            render_scene(scene, image_size).save(out / "images" / filename, format="PNG")
            sentences = [{"raw": raw, "tokens": clean_caption(raw, max_words=None).split(), "imgid": imgid, "sentid": imgid * CAPTIONS_PER_IMAGE + j,
                          "meaning": meaning} for j, (meaning, raw) in enumerate(make_captions(scene, rng, fn_density=fn_density))]
            images.append({"imgid": imgid, "filename": filename, "filepath": "images", "split": split,
                           "sentids": [s["sentid"] for s in sentences], "sentences": sentences, "scene": scene})
        block = images[first:]
        matches = match_matrix([im["scene"] for im in block], [s["meaning"] for im in block for s in im["sentences"]])
        offset = first * CAPTIONS_PER_IMAGE  # sentids of a split are contiguous
        for im, row in zip(block, matches, strict=True):
            positives[str(im["imgid"])] = (np.flatnonzero(row) + offset).tolist()
    compact = {"separators": (",", ":")}  # keeps the files a few MB at the default size
    (out / POSITIVES_NAME).write_text(json.dumps(positives, **compact))
    # The Karpathy JSON goes last: its presence marks a complete dataset.
    (out / JSON_NAME).write_text(json.dumps({"dataset": "synthetic", "images": images}, **compact))


def build_synthetic(root: str | os.PathLike, num_train: int = 4000, num_val: int = 500, num_test: int = 500,
                    image_size: int = 64, seed: int = 0, fn_density: str = "low") -> Path:
    """Create (or reuse) the synthetic dataset under ``root`` and return the path of its Karpathy JSON.

    The dataset lives in ``root/synthetic-v<version>-s<seed>-<train>-<val>-<test>-<size>px``
    (``images/*.png``, ``dataset_synthetic.json``, ``dataset_synthetic.positives.json``) and is
    deterministic in those parameters. It is rendered into a temporary sibling directory and moved
    into place with one ``os.replace``, so concurrent builders (DDP ranks) or a crash never leave a
    half-written dataset behind; a builder that loses the race discards its copy.

    Args:
        root: the cache directory.
        num_train: training images (five captions each).
        num_val: validation images.
        num_test: test images.
        image_size: the side of the images in pixels (at least 16).
        seed: the seed of the scenes and captions.
        fn_density: ``low`` (the benchmark as it always was), ``medium``, ``high`` or ``very_high``: a
            quarter, half or four fifths of the captions are vague, so captions are true of more images and false
            negatives are denser (:data:`FN_DENSITIES`; the measured densities: docs:
            results/synthetic-fn). Other densities live in directories of their own
            (``...-fn<density>``).

    Raises:
        FNEError: a bad value, or a directory of that name not written by this function.
    """
    check(fn_density in FN_DENSITIES, "data.fn_density", " | ".join(FN_DENSITIES), fn_density)
    for key, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_test", num_test, 1),
                            ("image_size", image_size, 16), ("seed", seed, 0)):
        check(isinstance(value, int) and not isinstance(value, bool) and value >= low, key, f"an integer >= {low}", value)
    root = Path(root)
    final = root / (f"synthetic-v{FORMAT_VERSION}-s{seed}-{num_train}-{num_val}-{num_test}-{image_size}px"
                    + ("" if fn_density == "low" else f"-fn{fn_density}"))
    result = final / JSON_NAME
    if result.is_file():
        return result
    if final.exists():
        raise FNEError(f"{final}: exists without {JSON_NAME}, so it was not written by build_synthetic; delete it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dataset(tmp, (num_train, num_val, num_test), image_size, seed, fn_density)
        try:
            os.replace(tmp, final)
        except OSError:  # another process moved its complete copy into place first
            if not result.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
