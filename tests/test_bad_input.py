"""Bad input through the real entry point: one clear line naming the culprit, non-zero exit, no traceback.

Every case runs ``python -m fne_lightning.train`` in a process of its own on files the fixture
writes (a small Karpathy dataset with real JPEGs, and broken variants of it). The processes are
forked from a server that imported torch, Lightning and open_clip once (``helpers.run_forked``:
33 fresh interpreters spent most of their 170 s importing them), and run concurrently; each case
is checked by its own test.
"""

from __future__ import annotations

import functools
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_OVERRIDES, compose_config
from helpers import offline_env, run_forked, write_karpathy

TINY = [o for o in TINY_OVERRIDES if not o.startswith("data.num_")]


def write_dataset(root: Path, mutate=None) -> Path:
    """Karpathy JSON + JPEGs: 4 train, 2 val, 2 test images, 2 captions each; ``mutate(data, root)``
    returns the JSON to write instead (an object, a string, or None for no file)."""
    path = write_karpathy(root, ["train"] * 4 + ["val"] * 2 + ["test"] * 2,
                          lambda i, split: [f"a photo number {i} {k}" for k in range(2)],
                          lambda i: Image.new("RGB", (24, 24), (30 * i, 90, 160)))
    if mutate:
        data = mutate(json.loads(path.read_text()), root)
        if data is None:
            path.unlink()
        else:
            path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def truncate(data: dict, root: Path) -> dict:
    # A larger, noisy picture so the cut falls in the image data, after the JPEG header.
    noise = torch.randint(0, 255, (96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(root / "img" / "5.jpg", format="JPEG")
    raw = (root / "img" / "5.jpg").read_bytes()
    (root / "img" / "5.jpg").write_bytes(raw[: len(raw) * 2 // 3])
    return data


def not_an_image(data: dict, root: Path) -> dict:
    (root / "img" / "6.jpg").write_text("this is not a picture")
    return data


def remove_image(data: dict, root: Path) -> dict:
    (root / "img" / "2.jpg").unlink()
    return data


def edit(fn):
    def mutate(data: dict, root: Path) -> dict:
        fn(data)
        return data
    return mutate


DATA_CASES = {
    "malformed_json": (lambda d, r: "{'images': [", "not valid JSON"),
    "missing_keys": (lambda d, r: {"pictures": d["images"]}, "'images' list"),
    "missing_split": (edit(lambda d: [im.update(split="train") for im in d["images"] if im["split"] == "val"]),
                      "no images in split(s) ['val']"),
    "image_missing": (remove_image, "2.jpg: file not found"),
    "image_truncated": (truncate, "5.jpg: truncated JPEG"),
    "not_an_image": (not_an_image, "6.jpg: not an image"),
    "empty_caption": (edit(lambda d: d["images"][1]["sentences"][0].update(raw=" ?!. ")),
                      "is empty after preprocessing"),
    "no_captions": (edit(lambda d: d["images"][0].update(sentences=[])), "has no captions"),
    # Ids that hand-made files get wrong: two images would silently become one for same-image masking.
    "duplicate_imgid": (edit(lambda d: d["images"][5].update(imgid=2)),
                        "image entry 5 ('5.jpg') has imgid 2, already used by image entry 2 ('2.jpg')"),
    "sentence_imgid": (edit(lambda d: d["images"][3]["sentences"][1].update(imgid=4)),
                       "sentence 7 of image entry 3 ('3.jpg') has imgid 4, expected its image's imgid 3"),
    "duplicate_sentid": (edit(lambda d: d["images"][6]["sentences"][0].update(sentid=1)),
                         "sentid 1 of image entry 6 ('6.jpg') is already used in image entry 0"),
}
CONFIG_CASES = {
    "bank_size": (["loss.memory_size=-1"], "loss.memory_size=-1"),
    "momentum": (["momentum=1.5"], "momentum=1.5"),
    "match_prior": (["loss.match_prior=0"], "loss.match_prior=0"),
    "tau": (["loss.tau=0"], "loss.tau=0"),
    "margin": (["loss.margin=-0.1"], "loss.margin=-0.1"),
    "cutdown": (["loss.cutdown=-0.1"], "loss.cutdown=-0.1"),
    "prior": (["loss.prior=learned"], "loss.prior='learned': expected fixed or estimated"),
    "exclude": (["loss.exclude=1.5"], "loss.exclude=1.5"),
    "batch_size": (["data.batch_size=0"], "data.batch_size=0"),
    "on_bad_image": (["data.on_bad_image=ignore"], "data.on_bad_image='ignore'"),
    "model_name": (["model.name=ViT-Q-99"], "model.name='ViT-Q-99'"),
    "weights_offline": (["model=clip_vit_b32"], "could not load pretrained weights 'openai'"),
    "malloc": (["malloc.trim_threshold_mb=0"], "malloc.trim_threshold_mb=0: expected an integer number of MB"),
    "missing_checkpoint": (["ckpt_path=/no/such/last.ckpt"], "ckpt_path='/no/such/last.ckpt': file not found"),
    # A value the config leaves ??? (required).
    "missing_value": (["data.root=/tmp", "experiment=none", "data=karpathy"],
                      "data.annotations: expected a value, none given (??? in the config: required); "
                      "give data.annotations=..."),
    # The contrastive losses' keys (loss=infonce, loss=siglip), FNE's queue and the optimizer's keys.
    "same_image": (["loss=infonce", "loss.same_image=both"], "loss.same_image='both': expected target or mask"),
    "false_negatives": (["loss=infonce", "loss.false_negatives=ignore"],
                        "loss.false_negatives='ignore': expected none | fne | distill | oracle"),
    "oracle_action": (["loss=infonce", "loss.oracle_action=flip"],
                      "loss.oracle_action='flip': expected eliminate or attract"),
    "queue_features_infonce": (["loss=infonce", "loss.queue_features=stale"],
                               "loss.queue_features='stale': expected momentum or online"),
    "queue_features_fne": (["loss.queue_features=stale"], "loss.queue_features='stale': expected momentum or online"),
    "temperature": (["loss=infonce", "loss.temperature=0"], "loss.temperature=0: expected a value > 0"),
    "alpha": (["loss=infonce", "loss.alpha=1.5"], "loss.alpha=1.5: expected a value in [0, 1]"),
    # A word where a number is expected: one line too, not a TypeError from the comparison.
    "temperature_word": (["loss=infonce", "loss.temperature=hot"], "loss.temperature='hot': expected a value > 0"),
    "tau_word": (["loss.tau=high"], "loss.tau='high': expected a value > 0"),
    "memory_size_infonce": (["loss=infonce", "loss.memory_size=-8"], "loss.memory_size=-8: expected an integer >= 0"),
    "siglip_distill": (["loss=siglip", "loss.false_negatives=distill"],
                       "loss.false_negatives='distill': expected none, fne or oracle for loss=siglip"),
    "optim_interval": (["optim.interval=batch"], "optim.interval='batch': expected epoch or step"),
    "optim_decay_1d": (["optim.decay_1d=maybe"], "optim.decay_1d='maybe': expected true or false"),
    # Checked when the run's length is known (configure_optimizers, inside the fit).
    "warmup_steps": (["optim=adamw_cosine", "optim.scheduler.warmup_steps=-1"],
                     "optim.scheduler.warmup_steps=-1: expected an integer >= 0"),
    # The oracles on data that declares no true matches (the dataset has no positives file): refused
    # by the loss's check_setup when the fit starts.
    "oracle_vsepp": (["loss=vsepp", "loss.oracle=true"],
                     "loss.oracle: the oracle needs the training data's true matches, and this data declares none"),
    "oracle_infonce": (["loss=infonce", "loss.false_negatives=oracle"],
                       "loss.false_negatives=oracle: the oracle needs the training data's true matches"),
}
# The shrunk run's overrides of keys that a group option does not have: no bank (vsepp, siglip), no
# Gaussians (vsepp), no milestones (adamw_cosine's schedule).
ABSENT = {"loss=vsepp": ("loss.memory_size", "loss.min_pos_samples"), "loss=siglip": ("loss.memory_size",),
          "optim=adamw_cosine": ("optim.scheduler.milestones",)}


def shrunk(args: list[str]) -> list[str]:
    """TINY without the overrides of keys that the groups chosen in ``args`` lack."""
    absent = {key for arg in args for key in ABSENT.get(arg, ())}
    return [o for o in TINY if o.split("=", 1)[0] not in absent]
# data=webdataset's evaluation config names its keys data.eval.<key>: the constructor's checks, the
# shard evaluation module's own and the annotation readers' alike (missing_keys/dataset.json: the
# Karpathy JSON without an 'images' list of the data case of that name).
WEBDATASET_CASES = {
    "eval_batch_size": (["data.eval.eval_batch_size=0"], "data.eval.eval_batch_size=0: expected a positive integer"),
    "eval_shards_root": (["data@data.eval=webdataset_eval", "data.eval.val_shards=/v.tar", "+data.eval.root=/x"],
                         "data.eval.root='/x': expected no value for shards"),
    "eval_reader": (["data@data.eval=karpathy", "data.eval.root=missing_keys",  # relative to the runs' cwd
                     "data.eval.annotations=missing_keys/dataset.json"],
                    "data.eval.annotations='missing_keys/dataset.json': expected a Karpathy JSON object with an "
                    "'images' list"),
}
HYDRA_CASES = {"unknown_model": "model=nope", "unknown_loss": "loss=nope", "unknown_data": "data=nope"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("bad_input")
    jobs: dict[str, list[str]] = {}
    for name, (mutate, _) in DATA_CASES.items():
        ann = write_dataset(base / name, mutate)
        jobs[name] = ["experiment=none", "data=karpathy", f"data.root={base / name}", f"data.annotations={ann}", "data.num_workers=0",
                      "data.batch_size=2", "data.eval_batch_size=2", "data.pin_memory=false"]
    good = write_dataset(base / "good")
    data = ["experiment=none", "data=karpathy", f"data.root={base / 'good'}", f"data.annotations={good}", "data.num_workers=0",
            "data.batch_size=2", "data.pin_memory=false"]
    jobs["data_root"] = ["experiment=none", "data=karpathy", "data.root=/no/such/dir", "data.annotations=/no/such/dir/d.json"]
    jobs["annotation_file"] = ["experiment=none", "data=karpathy", f"data.root={base / 'good'}", f"data.annotations={base / 'nope.json'}"]
    for name, (args, _) in CONFIG_CASES.items():
        jobs[name] = [*args, *(data if not args[0].startswith("data.") else [])]
    # A checkpoint of a model of another shape, and files that need pickled code to load.
    other = compose_config([*TINY_OVERRIDES, "model.context_length=16", f"paths.output_dir={base}"], cache_dir)
    from fne_lightning.train import build

    module, _ = build(other)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"model": {"name": "fne-tiny"}}},
               base / "other.ckpt")
    code = functools.partial(print, "pickled code")  # not allowed by torch.load(weights_only=True)
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "code": code}, base / "evil.ckpt")
    torch.save({"x": code}, base / "evil.pt")
    jobs["checkpoint_shape"] = [f"ckpt_path={base / 'other.ckpt'}", f"paths.cache_dir={cache_dir}"]
    jobs["untrusted_checkpoint"] = [f"ckpt_path={base / 'evil.ckpt'}", f"paths.cache_dir={cache_dir}"]
    jobs["untrusted_pretrained"] = [f"model.pretrained={base / 'evil.pt'}", f"paths.cache_dir={cache_dir}"]
    jobs["synthetic_root"] = ["+data.root=/data/flickr30k"]
    for name, arg in HYDRA_CASES.items():
        jobs[name] = [arg]
    # An empty file as the training shard: the evaluation config is read (and fails) before it.
    (base / "train.tar").touch()
    for name, (args, _) in WEBDATASET_CASES.items():
        jobs[name] = ["experiment=none", "data=webdataset", f"data.train_shards={base / 'train.tar'}",
                      "data.train_num_samples=10", *args]

    env = offline_env(OMP_NUM_THREADS="1")

    def launch(item: tuple[str, list[str]]) -> tuple[str, subprocess.CompletedProcess]:
        name, args = item
        # data=webdataset has no data.eval_batch_size: only the tiny run's other settings.
        tiny = [o for o in TINY if not o.startswith("data.")] if name in WEBDATASET_CASES else shrunk(args)
        return name, run_forked("train", *tiny, *args, f"hydra.run.dir={base / 'runs' / name}", cwd=base, env=env)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(launch, jobs.items()))


EXPECTED = {
    **{name: culprit for name, (_, culprit) in DATA_CASES.items()},
    **{name: culprit for name, (_, culprit) in CONFIG_CASES.items()},
    **{name: culprit for name, (_, culprit) in WEBDATASET_CASES.items()},
    "data_root": "data.root='/no/such/dir': directory not found",
    "annotation_file": "nope.json': annotation file not found",
    "checkpoint_shape": "does not fit the requested model (trained with model.name='fne-tiny'",
    "untrusted_checkpoint": "refused by torch.load(weights_only=True)",
    "untrusted_pretrained": "model.trust_pretrained=true",
    "synthetic_root": "data.root='/data/flickr30k': expected no value for data=synthetic",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_one_clear_error_line(outcomes: dict[str, subprocess.CompletedProcess], case: str) -> None:
    proc = outcomes[case]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and EXPECTED[case] in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (Path(proc.args[-1].split("=", 1)[1]) / "metrics.json").exists()


@pytest.mark.parametrize("case", sorted(HYDRA_CASES))
def test_unknown_group_option_is_named_by_hydra(outcomes: dict[str, subprocess.CompletedProcess], case: str) -> None:
    proc = outcomes[case]
    group, option = HYDRA_CASES[case].split("=")
    assert proc.returncode != 0 and f"Could not find '{group}/{option}'" in proc.stderr
    assert "Traceback" not in proc.stderr
