"""Training throughput and peak memory of one training step: every loss against VSE++ (FNE_SPEC sections 1-7).

Runs the real `RetrievalModule` in a real Lightning `Trainer` on random images and captions
(random init, no data or weights needed) and times the steps after a warm-up. The rows
(``--losses``, default all):

* ``vsepp``          VSE++ on in-batch online features (no momentum encoders); always run, every
                     ratio is against it;
* ``momentum_only``  VSE++ plus the momentum encoders' forward pass and EMA update (what FNE
                     needs before any of its own work);
* ``hardest_bank``   that plus the memory bank: VSE++ over the batch's and the bank's momentum
                     candidates (``FNELoss(selection="hardest")``: the two anchor-bank products,
                     the statistics, the hardest search and the enqueue, none of FNE's weighting
                     or sampling), the cost of any method that scores a bank of this size;
* ``fne``            the full FNE step: momentum forward, statistics, bank, weights, sampling,
                     diagnostics;
* ``fne_online``     FNE with ``queue_features=online`` (XBM): the bank holds detached online
                     features, no momentum encoder is built or stepped;
* ``infonce``        symmetric InfoNCE over the in-batch online features (CLIP; the model's own
                     ``logit_scale`` trained);
* ``infonce_queue``  InfoNCE over the batch's momentum features and a queue of ``--bank`` earlier
                     ones (ALBEF/MoCo: ``memory_size=bank``, ``queue_features=momentum``);
* ``infonce_queue_fne``, ``infonce_queue_distill``  the same with ``false_negatives=fne`` (FNE's
                     posterior weights the denominator) or ``distill`` (ALBEF's momentum
                     distillation);
* ``siglip``         the pairwise sigmoid loss over the in-batch online features.

``false_negatives=oracle`` has no row: it needs the data's declared true matches, and these
random pairs declare none (``benchmarks/bench_fne.py --positives`` times it on the loss alone).

FNE's own overhead is ``(fne - momentum_only) / fne`` of the step time (target: <= 5% on a
GPU with the paper's model shape). Each row's ``over_vsepp`` is its step over the VSE++ step of the
same round (median over the rounds). The queue rows of InfoNCE also get ``over_infonce_momentum``:
their step over ``infonce + (momentum_only - vsepp)`` of the same round, i.e. in-batch InfoNCE plus
the momentum towers' share, which isolates what the queue and the false-negative option add. The
order of the rows alternates from round to round, so that a drifting load hits every row alike.
Prints one JSON object per (loss, precision) and a table.

    python benchmarks/bench_step.py                          # GPU: f30k_vse shape, fp32 and bf16-mixed
    python benchmarks/bench_step.py --device cpu             # CPU: the tiny model (keeps the script alive)
    python benchmarks/bench_step.py --device cpu --shape vit-b32 --threads 1   # CPU: ViT-B/32 at 224 px
    python benchmarks/bench_step.py --device cpu --losses vsepp,fne,fne_online --repeats 3
    python benchmarks/bench_step.py --device cpu --shape vit-b32 --components --repeats 4   # the parts, ~3 min

``--components`` times the parts of a step apart instead (the towers' forward, backward and Adam;
the momentum towers' forward and EMA; one call of each loss) and predicts each row's ratio from
them: whole steps of a large model on a shared machine are too few and too noisy to resolve a few
percent, the parts repeat cheaply. On a machine loaded beyond its cores, ``--threads 1`` avoids the
OpenMP threads waiting for each other (the tiny model's step was 7-9x slower with 2 threads at a
load of 5-9), and each row also records its process CPU time (``step_cpu_ms``, ``cpu_over_vsepp``).

``--shape vit-b32`` is a realistic CPU shape: open_clip's ``ViT-B-32`` config (ViT-B/32 at 224 px,
a 12-layer, 512-wide text transformer, 151M parameters) from random init, built offline, batch 32,
bank 8,224, with fewer steps (1 timed step after 1 untimed, 3 rounds): all ten rows are about 23
minutes of CPU time (a step 17-30 s of one thread), under 20 minutes of wall time on 2 idle cores by
that estimate, 45 minutes measured with 1 thread on a loaded machine (docs: results/speed).
Explicit ``--model``, ``--batch``, ``--steps`` etc. override it.

The paper's shape is ViT-B/16 at 384 px plus BERT-base (`fne-vit-b16-384-bert`), which needs
`transformers` and the bert-base-uncased config; without them the script uses open_clip's
ViT-B-16 at 384 px with a 12-layer, 768-wide text transformer (the same compute shape) and
says so in its output.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_name.py beside this script

from results_name import machine_kind  # noqa: E402

from fne_lightning.losses import FNELoss, InfoNCELoss, RetrievalLoss, SigLIPLoss, VSELoss  # noqa: E402
from fne_lightning.models.encoders import DualEncoder  # noqa: E402
from fne_lightning.module import RetrievalModule  # noqa: E402
from fne_lightning.utils.malloc import configure_like_training  # noqa: E402


class MomentumOnly(VSELoss):
    """VSE++ that also runs the momentum encoders: the baseline FNE's own overhead is measured against."""

    requires_momentum = True


# Every row: a loss built from the feature dimension D and the bank size K.
LOSSES: dict[str, Callable[[int, int], RetrievalLoss]] = {
    "vsepp": lambda d, k: VSELoss(),
    "momentum_only": lambda d, k: MomentumOnly(),
    "hardest_bank": lambda d, k: FNELoss(embed_dim=d, memory_size=k, warmup_epochs=0, selection="hardest"),
    "fne": lambda d, k: FNELoss(embed_dim=d, memory_size=k, warmup_epochs=0),
    "fne_online": lambda d, k: FNELoss(embed_dim=d, memory_size=k, warmup_epochs=0, queue_features="online"),
    "infonce": lambda d, k: InfoNCELoss(embed_dim=d),
    "infonce_queue": lambda d, k: InfoNCELoss(embed_dim=d, memory_size=k),
    "infonce_queue_fne": lambda d, k: InfoNCELoss(embed_dim=d, memory_size=k, false_negatives="fne"),
    "infonce_queue_distill": lambda d, k: InfoNCELoss(embed_dim=d, memory_size=k, false_negatives="distill"),
    "siglip": lambda d, k: SigLIPLoss(embed_dim=d),
}
# The rows that hold a bank or queue of --bank slots.
BANKED = ("hardest_bank", "fne", "fne_online", "infonce_queue", "infonce_queue_fne", "infonce_queue_distill")
# Named shapes: defaults of the options they set (an option given on the command line wins).
SHAPES: dict[str, dict[str, object]] = {
    "default": {"model": "auto", "batch": 32, "bank": 8224, "steps": 20, "warmup": 5, "repeats": 1},
    "vit-b32": {"model": "ViT-B-32", "batch": 32, "bank": 8224, "steps": 1, "warmup": 1, "repeats": 3},
}


class RandomPairs(Dataset):
    def __init__(self, n: int, size: int, context: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.tokens = torch.randint(1, vocab, (n, context), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.tokens[i], i, i


class StepTimer(L.Callback):
    """Wall time of each step after ``warmup``, and the process's CPU time (all threads) in it:
    on a shared machine the CPU time shows how much of a step's wall time was spent waiting."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.cpu_times, self._start, self._cpu = warmup, [], [], 0.0, 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu)


def encoder_for(args: argparse.Namespace) -> tuple[DualEncoder, str]:
    if args.model != "auto":
        return DualEncoder(args.model), args.model
    if args.device == "cpu":
        return DualEncoder("fne-tiny"), "fne-tiny"
    if importlib.util.find_spec("transformers") is not None:
        try:
            return DualEncoder("fne-vit-b16-384-bert"), "fne-vit-b16-384-bert"
        except Exception as err:  # bert config not reachable offline
            print(f"# fne-vit-b16-384-bert unavailable ({err}); using the open_clip equivalent", file=sys.stderr)
    return DualEncoder("ViT-B-16", image_size=384), "ViT-B-16@384 (BERT-base-sized text tower stand-in)"


_BUILT: dict[str, object] = {}


def fresh_encoder(args: argparse.Namespace) -> tuple[DualEncoder, str]:
    """A copy of the encoder built once per process under seed 0: every run starts from the same
    weights, and a large model's random init (about 10 s for ViT-B-32 on 2 cores) is paid once."""
    if "encoder" not in _BUILT:
        torch.manual_seed(0)
        _BUILT["encoder"], _BUILT["model_name"] = encoder_for(args)
    return copy.deepcopy(_BUILT["encoder"]), str(_BUILT["model_name"])


def data_for(args: argparse.Namespace, encoder: DualEncoder) -> RandomPairs:
    if "data" not in _BUILT:
        size = encoder.image_config.size
        context = int(encoder.tokenizer(["x"]).shape[-1])
        _BUILT["data"] = RandomPairs(args.batch * (args.steps + args.warmup), size, context, vocab=1000)
    return _BUILT["data"]  # type: ignore[return-value]


def run(args: argparse.Namespace, loss_name: str, precision: str) -> dict[str, object]:
    encoder, model_name = fresh_encoder(args)
    torch.manual_seed(0)
    loss = LOSSES[loss_name](encoder.embed_dim, args.bank)
    module = RetrievalModule(encoder, loss, optimizer=partial(torch.optim.Adam, lr=2e-5, fused=True))
    data = data_for(args, encoder)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=args.steps + args.warmup,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=args.batch, drop_last=True))
    step = _median(timer.times)
    row = {
        "loss": loss_name, "precision": precision, "device": args.device, "model": model_name,
        "batch": args.batch, "bank": args.bank if loss_name in BANKED else 0,
        "momentum_encoder": module.momentum_encoder is not None,
        "step_ms": round(1e3 * step, 2), "samples_per_s": round(args.batch / step, 1),
        "step_cpu_ms": round(1e3 * _median(timer.cpu_times), 2),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
        "load_1min": round(load, 2) if load is not None else None,
    }
    del trainer, module, loss, encoder
    gc.collect()
    return row


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def components(args: argparse.Namespace) -> list[dict[str, object]]:
    """The parts of a step, timed apart in interleaved rounds: the online towers' step (forward,
    backward and Adam on the first batch, a stand-in loss), the momentum towers' forward and EMA
    update, and one call of each row's loss (forward and backward) on random unit features with a
    full bank. Each row's ratio to VSE++ is then predicted as ``(towers + loss [+ momentum]) /
    (towers + vsepp's loss)``: on a shared machine whole steps of a large model are too few and too
    noisy to resolve a few percent, while these parts repeat cheaply. CPU time of the process."""
    from fne_lightning.models.encoders import ema_update, momentum_copy

    encoder, model_name = fresh_encoder(args)
    twin = momentum_copy(encoder)
    optimizer = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=2e-5, fused=True)
    data = data_for(args, encoder)
    images, tokens = data.images[: args.batch], data.tokens[: args.batch]

    def towers() -> None:
        v, t = encoder.encode_image(images), encoder.encode_text(tokens)
        (v * t).sum().neg().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def momentum() -> None:
        with torch.no_grad():
            twin.encode_image(images), twin.encode_text(tokens)
        ema_update(twin, encoder, 0.995)

    def timed(fn: Callable[[], None]) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - cpu, time.perf_counter() - wall

    towers(), momentum()  # warm-up
    parts: dict[str, list[tuple[float, float]]] = {"towers": [], "momentum": []}
    for i in range(args.repeats):
        for name in ("towers", "momentum") if i % 2 == 0 else ("momentum", "towers"):
            parts[name].append(timed(towers if name == "towers" else momentum))
    # One call of each loss on (B, D) unit features; banks full of random unit features.
    dim, gen = encoder.embed_dim, torch.Generator().manual_seed(0)

    def unit(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)

    losses = {}
    for name in args.names:
        loss = LOSSES[name](dim, args.bank)
        bank = getattr(loss, "bank", None)
        if bank is not None and bank.size:
            bank.enqueue(unit(bank.size), unit(bank.size), torch.randint(0, 2**40, (bank.size,), generator=gen),
                         torch.arange(bank.size))
        loss.set_generator(gen)
        losses[name] = loss
    ids, feats = torch.arange(args.batch), [unit(args.batch) for _ in range(4)]

    def call(loss: RetrievalLoss) -> None:
        v, t = feats[0].clone().requires_grad_(), feats[1].clone().requires_grad_()
        value, _ = loss(v, t, ids, ids, momentum_image_features=feats[2], momentum_text_features=feats[3])
        value.backward()

    calls: dict[str, list[float]] = {name: [] for name in losses}
    for i in range(25):
        for name in list(losses) if i % 2 == 0 else list(losses)[::-1]:
            cpu = timed(lambda name=name: call(losses[name]))[0]
            if i >= 5:
                calls[name].append(cpu)
    tower_s, momentum_s = _median([c for c, _ in parts["towers"]]), _median([c for c, _ in parts["momentum"]])
    loss_s = {name: _median(x) for name, x in calls.items()}
    uses_momentum = {name: bool(losses[name].requires_momentum) for name in losses}

    def predicted(name: str) -> float:
        return tower_s + loss_s[name] + (momentum_s if uses_momentum[name] else 0.0)

    rows = []
    for name in losses:
        row: dict[str, object] = {
            "part": "components", "loss": name, "device": args.device, "model": model_name, "batch": args.batch,
            "bank": args.bank if name in BANKED else 0, "momentum_encoder": uses_momentum[name],
            "loss_call_cpu_ms": round(1e3 * loss_s[name], 2),
            "towers_cpu_ms_rounds": [round(1e3 * c, 1) for c, _ in parts["towers"]],
            "momentum_cpu_ms_rounds": [round(1e3 * c, 1) for c, _ in parts["momentum"]],
            "towers_wall_ms_rounds": [round(1e3 * w, 1) for _, w in parts["towers"]],
            "momentum_wall_ms_rounds": [round(1e3 * w, 1) for _, w in parts["momentum"]],
            "predicted_over_vsepp": round(predicted(name) / predicted("vsepp"), 3),
        }
        if name.startswith("infonce_queue") and "infonce" in losses:
            row["predicted_over_infonce_momentum"] = round(
                predicted(name) / (predicted("infonce") + momentum_s), 3)
        row.update(repeats=args.repeats, threads=torch.get_num_threads(), malloc=args.malloc,
                   machine=machine_kind(args.device))
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="default", choices=list(SHAPES),
                        help="named shape: 'default' (the tiny model on a CPU, the paper's on a GPU) or 'vit-b32' "
                             "(open_clip's ViT-B-32, random init: a realistic CPU shape, fewer steps and rounds)")
    parser.add_argument("--model", default=None, help="an open_clip or fne-* model name; default: the shape's")
    parser.add_argument("--batch", type=int, default=None, help="per step (the paper's is 32)")
    parser.add_argument("--bank", type=int, default=None, help="memory bank / queue slots (default 8,224)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; vit-b32: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; vit-b32: 1)")
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help="comma-separated rows (vsepp is always run); default: all of " + ", ".join(LOSSES))
    parser.add_argument("--precisions", default=None, help="default: 32-true,bf16-mixed on cuda; 32-true on cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of the rows, interleaved (default 1; vit-b32: 3); each row's step time is the "
                             "median over the rounds (a shared CPU's load drifts: one round of each is noisy)")
    parser.add_argument("--components", action="store_true",
                        help="time the parts of a step apart (towers, momentum towers + EMA, each loss call) and "
                             "predict each row's ratio from them, instead of whole steps (CPU only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's, the cores); on a machine loaded beyond its "
                             "cores, 1 avoids the OpenMP threads waiting for each other (10x slower steps there)")
    parser.add_argument("--malloc", default="train", choices=["train", "glibc"],
                        help="glibc's allocator thresholds as training sets them (conf/train.yaml `malloc`), "
                             "or glibc's defaults")
    args = parser.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        parser.error(f"--losses: unknown {', '.join(unknown)} (choose from {', '.join(LOSSES)})")
    args.names = tuple(n for n in LOSSES if n == "vsepp" or n in names)  # the table's order, vsepp first
    if args.components and args.device != "cpu":
        parser.error("--components times the parts on the CPU only (CPU time of the process)")
    return args


def main() -> None:
    args = parse_args()
    configure_like_training(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.components:
        wall = time.perf_counter()
        rows = components(args)
        for row in rows:
            print(json.dumps(row), flush=True)
        r0 = rows[0]
        print(f"\ntowers' step {_median(r0['towers_cpu_ms_rounds']):.1f} ms CPU (rounds "
              f"{', '.join(map(str, r0['towers_cpu_ms_rounds']))}), momentum forward + EMA "
              f"{_median(r0['momentum_cpu_ms_rounds']):.1f} ms (rounds "
              f"{', '.join(map(str, r0['momentum_cpu_ms_rounds']))})")
        print(f"{'loss':>22} {'loss call ms':>13} {'predicted / vsepp':>18} {'/ (infonce + momentum)':>23}")
        for r in rows:
            extra = f"{r['predicted_over_infonce_momentum']:.3f}" if "predicted_over_infonce_momentum" in r else "-"
            print(f"{r['loss']:>22} {r['loss_call_cpu_ms']:>13.2f} {r['predicted_over_vsepp']:>18.3f} {extra:>23}")
        print(f"\nmodel: {r0['model']}, batch {args.batch}, bank {args.bank}, {args.repeats} rounds, "
              f"{torch.get_num_threads()} threads; {(time.perf_counter() - wall) / 60:.1f} min in all")
        return
    precisions = (args.precisions or ("32-true,bf16-mixed" if args.device == "cuda" else "32-true")).split(",")
    names = args.names
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    wall = time.perf_counter()
    for precision in precisions:
        rounds: list[dict[str, dict[str, object]]] = []
        for i in range(args.repeats):
            # Alternate the order so that a load drifting over a round weighs on every row alike.
            order = names if i % 2 == 0 else names[::-1]
            rounds.append({name: run(args, name, precision) for name in order})
        by_loss = {}
        for name in names:
            step = _median([r[name]["step_ms"] for r in rounds])
            by_loss[name] = {**rounds[0][name], "step_ms": round(step, 2),
                             "samples_per_s": round(args.batch / step * 1e3, 1),
                             "step_ms_rounds": [r[name]["step_ms"] for r in rounds],
                             "step_cpu_ms": round(_median([r[name]["step_cpu_ms"] for r in rounds]), 2),
                             "step_cpu_ms_rounds": [r[name]["step_cpu_ms"] for r in rounds],
                             "load_1min_rounds": [r[name]["load_1min"] for r in rounds]}
            by_loss[name].pop("load_1min")
        # Per round, so that the load one round ran under cancels out of the ratio.
        ratios = {name: _median([r[name]["step_ms"] / r["vsepp"]["step_ms"] for r in rounds]) for name in names}
        fne_overhead = None
        if "fne" in names and "momentum_only" in names:
            fne_overhead = round(100 * _median([(r["fne"]["step_ms"] - r["momentum_only"]["step_ms"])
                                                / r["fne"]["step_ms"] for r in rounds]), 1)
        for name, row in by_loss.items():
            row["over_vsepp"] = round(ratios[name], 3)
            row["over_vsepp_rounds"] = [round(r[name]["step_ms"] / r["vsepp"]["step_ms"], 3) for r in rounds]
            # The same ratio of CPU time (all threads): less sensitive to time spent descheduled.
            row["cpu_over_vsepp"] = round(_median([r[name]["step_cpu_ms"] / r["vsepp"]["step_cpu_ms"]
                                                   for r in rounds]), 3)
            if name.startswith("infonce_queue") and "infonce" in names and "momentum_only" in names:
                # In-batch InfoNCE plus the momentum towers' share, in the same round.
                row["over_infonce_momentum"] = round(_median([
                    r[name]["step_ms"] / (r["infonce"]["step_ms"] + r["momentum_only"]["step_ms"]
                                          - r["vsepp"]["step_ms"]) for r in rounds]), 3)
            row["fne_overhead_pct"] = fne_overhead
            row.update(shape=args.shape, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                       threads=torch.get_num_threads(), malloc=args.malloc, machine=machine_kind(args.device),
                       started=started)
            print(json.dumps(row), flush=True)
            rows.append(row)
    minutes = (time.perf_counter() - wall) / 60
    print(f"\n{'precision':>11} {'loss':>22} {'step ms':>9} {'samples/s':>10} {'peak GB':>8} {'/ vsepp':>8} "
          f"{'/ (infonce + momentum)':>23} {'cpu / vsepp':>12}  rounds / vsepp")
    for r in rows:
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        extra = f"{r['over_infonce_momentum']:.2f}" if "over_infonce_momentum" in r else "-"
        per_round = " ".join(f"{x:.2f}" for x in r["over_vsepp_rounds"])
        print(f"{r['precision']:>11} {r['loss']:>22} {r['step_ms']:>9.2f} {r['samples_per_s']:>10.1f} "
              f"{mem:>8} {r['over_vsepp']:>8.2f} {extra:>23} {r['cpu_over_vsepp']:>12.2f}  {per_round}")
    overhead = rows[0]["fne_overhead_pct"]
    print(f"\nmodel: {rows[0]['model']}, batch {rows[0]['batch']}, bank {args.bank}, device {args.device}, "
          f"{args.warmup} + {args.steps} steps x {args.repeats} rounds, {torch.get_num_threads()} threads; "
          + (f"FNE's own overhead {overhead:.1f}% of its step; " if overhead is not None else "")
          + f"{minutes:.1f} min in all")


if __name__ == "__main__":
    main()
