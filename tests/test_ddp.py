"""Real DDP on CPU (gloo, 2 processes): one consistent bank, exact statistics, exact metrics, and
InfoNCE's and SigLIP's losses and gradients equal to one process's over the global batch.

No mocks: the component tests run ``torch.distributed`` with the gloo backend in two spawned
processes; the Lightning tests use a real Trainer with ``ddp_spawn``; the entry-point test launches
it with ``trainer=ddp`` exactly as a user would.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict

from fne_lightning.fne.bank import MemoryBank
from fne_lightning.fne.stats import SimilarityStats
from fne_lightning.losses import FNELoss, InfoNCELoss, SigLIPLoss
from fne_lightning.train import build

from conftest import TINY_OVERRIDES, compose_config
from helpers import run_entry_point

WORLD, B, D, K, STEPS = 2, 3, 8, 10, 5  # K = 10 is not a multiple of the global batch of 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of a step: WORLD * B pairs; rank r holds rows [r * B, (r + 1) * B)."""
    g = torch.Generator().manual_seed(step)
    n = WORLD * B
    v = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    t = F.normalize(v + 0.5 * torch.randn(n, D, generator=g), dim=-1)
    ids = torch.randint(0, 4, (n,), generator=g)  # repeated ids: same-image pairs across ranks
    return {"v": v, "t": t, "mv": v.flip(-1), "mt": t.flip(-1), "ids": ids, "tids": torch.arange(n) + step * n}


def _worker(rank: int, port: int, out: str, gather_batch: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    loss = FNELoss(embed_dim=D, memory_size=K, min_pos_samples=1, warmup_epochs=0, gather_batch=gather_batch)
    loss.generator = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        batch = {k: x[rank * B:(rank + 1) * B] for k, x in global_batch(step).items()}
        v, t = batch["v"].requires_grad_(), batch["t"].requires_grad_()
        value, _ = loss(v, t, batch["ids"], batch["tids"], batch["mv"], batch["mt"])
        value.backward()
    torch.save({"bank": loss.bank.state_dict(), "stats": loss.stats.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("gather_batch", [False, True])
def test_ranks_hold_one_bank_and_statistics_equal_single_process(tmp_path: Path, gather_batch: bool) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path), gather_batch), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # One process, the same global batches in the same order (rank 0's rows first).
    bank, stats = MemoryBank(K, D), SimilarityStats(min_pos_samples=1)
    for step in range(STEPS):
        batch = global_batch(step)
        bank.enqueue(batch["mv"], batch["mt"], batch["ids"], batch["tids"])
        for r in range(WORLD):  # each rank's in-batch similarities, merged exactly
            rows = slice(r * B, (r + 1) * B)
            stats.update(batch["v"][rows] @ batch["t"][rows].T, batch["ids"][rows, None] == batch["ids"][None, rows])
    for r in range(WORLD):
        for key, want in bank.state_dict().items():
            assert torch.equal(ranks[r]["bank"][key], want), (r, key)
        for key, want in stats.state_dict().items():
            torch.testing.assert_close(ranks[r]["stats"][key], want, rtol=1e-12, atol=1e-12)
    assert int(bank.filled) == K and int(stats.pos_count) > 0


class SaveState(L.Callback):
    """Each rank writes what FNE keeps, so the test can compare ranks."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        state = {k: v for k, v in module.state_dict().items()
                 if k.startswith(("loss.bank", "loss.stats", "momentum_encoder", "encoder"))}
        torch.save(state, f"{self.out}/rank{trainer.global_rank}.pt")


def tiny(cfg_overrides: list[str], cache_dir: Path, tmp_path: Path) -> DictConfig:
    cfg = compose_config([*TINY_OVERRIDES, *cfg_overrides], cache_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_trainer_ddp_keeps_banks_statistics_and_momentum_encoders_identical(cache_dir: Path, tmp_path: Path) -> None:
    cfg = tiny(["loss.warmup_epochs=0", "loss.memory_size=40"], cache_dir, tmp_path)
    L.seed_everything(0)
    module, datamodule = build(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SaveState(str(tmp_path))])
    trainer.fit(module, datamodule=datamodule)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # 4 steps x 2 ranks x 16 pairs enqueued into 40 slots: full, wrapped around.
    assert int(rank0["loss.bank.filled"]) == 40 and int(rank0["loss.bank.ptr"]) == (4 * 2 * 16) % 40


def test_validation_metrics_with_two_processes_equal_one_process(cache_dir: Path, tmp_path: Path) -> None:
    # 7 images (35 captions) in batches of 4: the distributed sampler pads with duplicates.
    cfg = tiny(["data.num_val=7", "data.eval_batch_size=4"], cache_dir, tmp_path)
    results = []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        L.seed_everything(0)
        module, datamodule = build(cfg)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        results.append(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    assert results[0]["val/rsum"] > 0
    assert results[0] == results[1]


@pytest.mark.parametrize(("loss", "diagnostic"), [
    ("fne", "fne/sampled_fn_rate"),
    # After the tiny config's VSE warm-up epoch, which leaves the scale (and bias) unused: InfoNCE
    # with its queue of momentum features (loss.memory_size=48), and SigLIP (no queue).
    pytest.param("infonce", "train/logit_scale", marks=pytest.mark.slow),
    pytest.param("siglip", "train/logit_bias", marks=pytest.mark.slow),
])
def test_entry_point_ddp_run_writes_metrics_once(loss: str, diagnostic: str, cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if o != "~logger" and not (loss == "siglip" and "memory_size" in o)]
    proc = run_entry_point("train", *overrides, f"loss={loss}", "trainer=ddp", "trainer.accelerator=cpu",
                           "trainer.devices=2", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json"))
    assert written == [Path("run/metrics.json")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/rsum"] > 0 and diagnostic in metrics
    assert proc.stdout.count("Image-to-text") == 1  # the table is printed by rank 0 only


def test_slurm_launcher_config_follows_the_trainer(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from fne_lightning.utils.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "experiment=f30k_vse", "trainer=ddp",
                                          "trainer.devices=8", "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 2)
    assert cfg.trainer.strategy == "ddp"


# ----------------------------------------------------------------------------------------------
# InfoNCE and SigLIP: two processes give the loss and the gradients of one process over the
# global batch (the candidates gathered with the gradient, each rank's loss over its own anchors).

CONTRASTIVE = {  # name: (class, settings); the ids of CAPTION_IDS split images across the ranks
    "infonce": (InfoNCELoss, {}),
    "infonce_mask": (InfoNCELoss, {"same_image": "mask"}),
    "infonce_queue": (InfoNCELoss, {"memory_size": K}),
    "infonce_queue_distill": (InfoNCELoss, {"memory_size": K, "false_negatives": "distill"}),
    "siglip": (SigLIPLoss, {}),
}
# Image 0 has three captions (two on rank 0, one on rank 1), image 1 one on each rank; image 2 one.
CAPTION_IDS = torch.tensor([0, 1, 0, 0, 2, 1])
PROGRESS = 0.5  # inside distillation's alpha ramp


def contrastive_batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of a step: the captions of one image share its (momentum) image feature."""
    g = torch.Generator().manual_seed(100 + step)
    n = WORLD * B
    images = F.normalize(torch.randn(3, D, generator=g), dim=-1)
    v = images[CAPTION_IDS]
    t = F.normalize(v + 0.7 * torch.randn(n, D, generator=g), dim=-1)
    mv = F.normalize(v + 0.1 * torch.randn(n, D, generator=g), dim=-1)
    mt = F.normalize(t + 0.1 * torch.randn(n, D, generator=g), dim=-1)
    return {"v": v, "t": t, "mv": mv, "mt": mt, "ids": CAPTION_IDS.clone(), "tids": torch.arange(n) + step * n}


def contrastive_steps(loss: torch.nn.Module, rows: slice) -> list[dict[str, torch.Tensor]]:
    """STEPS steps of ``loss`` on ``rows`` of each global batch (features requiring a gradient):
    the loss, the features' and the scale's (and bias's) gradients, and the queue at the end."""
    out = []
    loss.set_progress(PROGRESS)
    log_scale, bias = loss.scale_parameters()
    for step in range(STEPS):
        batch = {k: x[rows].clone() for k, x in contrastive_batch(step).items()}
        v, t = batch["v"].requires_grad_(), batch["t"].requires_grad_()
        log_scale.grad = None
        if bias is not None:
            bias.grad = None
        value, _ = loss(v, t, batch["ids"], batch["tids"], batch["mv"], batch["mt"])
        value.backward()
        out.append({"loss": value.detach(), "v": v.grad, "t": t.grad, "scale": log_scale.grad.clone(),
                    "bias": bias.grad.clone() if bias is not None else torch.zeros(())})
    out.append({k: b.clone() for k, b in loss.state_dict().items() if k.startswith("bank.")})
    return out


def warmup_scale_gradients(loss: torch.nn.Module, rows: slice) -> list[torch.Tensor]:
    """The scale's (and bias's) gradients after one warm-up step (in-batch VSE, which does not use them)."""
    batch = {k: x[rows].clone() for k, x in contrastive_batch(0).items()}
    params = [p for p in loss.scale_parameters() if p is not None]
    for p in params:
        p.grad = None
    value, _ = loss(batch["v"].requires_grad_(), batch["t"].requires_grad_(), batch["ids"], batch["tids"],
                    batch["mv"], batch["mt"], warmup=True)
    value.backward()
    return [p.grad for p in params]


def _contrastive_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for name, (cls, settings) in CONTRASTIVE.items():
        loss = cls(embed_dim=D, gather_batch=True, **settings)
        results[name] = contrastive_steps(loss, slice(rank * B, (rank + 1) * B))
        results[f"{name}_warmup"] = warmup_scale_gradients(loss, slice(rank * B, (rank + 1) * B))
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_contrastive_losses_and_gradients_with_two_processes_equal_one_process(tmp_path: Path) -> None:
    """InfoNCE in-batch (image-id targets, or the other captions masked), InfoNCE with a queue of
    momentum features (and with momentum distillation inside its ramp) and SigLIP, 2 gloo
    processes against 1 over the same global batches, step after step as the queue fills: the
    mean of the ranks' losses is the loss, each rank's feature gradients averaged as DDP averages
    (divided by the world size) are the global batch's rows of the gradient, the mean of the
    ranks' scale and bias gradients is the gradient, and every rank holds the one process's queue.
    A warm-up step gives the unused scale and bias a zero gradient on every rank."""
    mp.spawn(_contrastive_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    worst = 0.0
    for name, (cls, settings) in CONTRASTIVE.items():
        one = contrastive_steps(cls(embed_dim=D, gather_batch=True, **settings), slice(None))
        for step in range(STEPS):
            want, got = one[step], [r[name][step] for r in ranks]
            pairs = [(torch.stack([g["loss"] for g in got]).mean(), want["loss"], "loss"),
                     (torch.stack([g["scale"] for g in got]).mean(), want["scale"], "scale"),
                     (torch.stack([g["bias"] for g in got]).mean(), want["bias"], "bias")]
            for key in ("v", "t"):
                pairs.append((torch.cat([g[key] for g in got]) / WORLD, want[key], key))
            for a, b, what in pairs:
                # fp32 sums in another order: equal up to rounding (SigLIP's loss sums 36 terms, ~20)
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name} step {step}: {what}")
                worst = max(worst, float((a - b).abs().max()))
            assert want["scale"].abs() > 0 and want["v"].abs().sum() > 0, name  # gradients that say something
        for r in range(WORLD):
            for key, value in one[-1].items():
                assert torch.equal(ranks[r][name][-1][key], value), (name, r, key)
        if settings.get("memory_size"):
            assert int(one[-1]["bank.filled"]) == K  # the later steps scored against a queue
        # The warm-up leaves the scale and bias unused: under DDP they still get a (zero) gradient, or
        # DDP stops at the next step (a real Trainer: test_entry_point_ddp_run_writes_metrics_once).
        for r in range(WORLD):
            grads = ranks[r][f"{name}_warmup"]
            assert len(grads) == (2 if cls is SigLIPLoss else 1)
            assert all(g is not None and torch.equal(g, torch.zeros(())) for g in grads), (name, r, grads)
    print(f"max abs difference, 2 processes vs 1: {worst:.2e}")
