"""``detect train``: wires datasets, model, optimiser and the engine; checkpoints, metrics, plots, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.checkpoint import FORMAT, WeightsError, atomic_save, load_checkpoint, load_model, save_weights
from detector.fileio import atomic_open
from detector.engine import EvalSet, NonFiniteLossError, cosine_warmup, evaluate, train_one_epoch
from detector.loss import MultiBoxLoss
from detector.models import build_model
from detector.models.rnnpool_face import RNNPoolFace, RNNPoolFaceConfig

__all__ = ["TrainConfig", "load_records", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in every checkpoint).

    Defaults are the paper's recipe (SGD, momentum 0.9, weight decay, cosine LR with warm-up, S3FD matching and
    loss) sized for 2 CPU cores.
    """

    data: str
    out: str
    model: str = "rnnpool_face_m4"
    input_size: tuple[int, int] | None = None  # override the variant's (width, height), e.g. for tiny runs
    format: str = "voc"  # voc (SCUT-HEAD) | wider
    train_split: str = "partB_train"
    val_split: str | None = "partB_val"
    epochs: int = 120
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    ema_decay: float = 0.999
    eval_every: int = 5
    num_workers: int = 1
    cache_max_side: int = 640
    seed: int = 0
    device: str = "auto"
    max_train_images: int | None = None
    face_labels: str | None = None  # teacher face boxes (JSON) -> train a face model on SCUT-HEAD images
    face_min_score: float = 0.5  # teacher score that makes a face (see FaceLabelPolicy)
    holdout: int = 0  # hold out N training images (seeded draw) for model selection; they replace val_split
    init_weights: str | None = None  # start from these weights (tensors of matching name and shape), fresh schedule
    compile: bool = False
    progress: bool = True


def load_records(data: str | Path, fmt: str, split: str, face_labels: str | Path | None = None,
                 face_min_score: float = 0.5) -> list:
    """Records of one split (SCUT-HEAD VOC split name/file, or a WIDER subset name).

    Args:
        face_labels: a pseudo-label file (VOC only): the records become face records
            (:func:`detector.datasets.pseudo_faces.face_records`); ``"auto"`` is ``DATA/faces_retinaface.json``.
        face_min_score: teacher score that makes a face.
    """
    if face_labels is not None and fmt != "voc":
        raise ValueError("face pseudo-labels go with the SCUT-HEAD (voc) layout")
    if fmt == "voc":
        from detector.datasets.voc import load_voc

        records, _ = load_voc(data, split)
    elif fmt == "wider":
        from detector.datasets.wider import load_wider

        records, _ = load_wider(data, split)
    else:
        raise ValueError(f"unknown dataset format {fmt!r} (voc or wider)")
    if face_labels is not None:
        from detector.datasets.pseudo_faces import DEFAULT_FACE_LABELS, FaceLabelPolicy, face_records, read_face_labels

        path = Path(data) / DEFAULT_FACE_LABELS if str(face_labels) == "auto" else Path(face_labels)
        if not path.is_file():
            raise ValueError(f"face pseudo-label file not found: {path}")
        records, _ = face_records(records, read_face_labels(path), FaceLabelPolicy(min_score=face_min_score))
    if not records:
        raise ValueError(f"no images in {data} split {split!r}")
    return records


def split_holdout(records: list, n: int, seed: int) -> tuple[list, list]:
    """Splits ``records`` into (train, held out): ``n`` records drawn with ``seed``; both keep the input order."""
    if not 0 < n < len(records):
        raise ValueError(f"holdout must be between 1 and {len(records) - 1} (the split has {len(records)} images)")
    held = set(np.random.default_rng(seed).choice(len(records), size=n, replace=False).tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def load_matching_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copies the tensors of ``state`` whose name and shape match ``model``'s (e.g. a head model into a two-class
    model: all but the class-logit convs); returns the names of the model's tensors left as initialised."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)


def _best_so_far(path: Path) -> float:
    if not path.is_file():
        return -1.0
    return float(load_checkpoint(path).get("meta", {}).get("val_ap50", -1.0))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _append_metrics(path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, first_epoch: int) -> None:
    """Drops the rows of epochs ``>= first_epoch`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < first_epoch]
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss terms, lr and val AP50 per epoch to one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.5))
    FigureCanvasAgg(fig)
    ep = [r["epoch"] for r in rows]
    ax = fig.add_subplot(1, 3, 1)
    for key in ("loss", "loss_cls", "loss_box"):
        ax.plot(ep, [r[key] for r in rows], label=key)
    ax.set_xlabel("epoch"), ax.set_title("training loss"), ax.legend()
    ax = fig.add_subplot(1, 3, 2)
    ax.plot(ep, [r["lr"] for r in rows])
    ax.set_xlabel("epoch"), ax.set_title("learning rate")
    ax = fig.add_subplot(1, 3, 3)
    val = [(r["epoch"], r["val_ap50"]) for r in rows if r.get("val_ap50") is not None]
    if val:
        ax.plot(*zip(*val), marker="o")
    ax.set_xlabel("epoch"), ax.set_title("val AP50"), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def ema_with_warmup(decay: float):
    """EMA update with a warm-up of the decay, ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the
    average does not stay anchored to the random initial weights early in a short run."""

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay).to(averaged.dtype) \
            if averaged.is_floating_point() else 0
        return averaged * d + current * (1 - d) if averaged.is_floating_point() else current

    return avg_fn


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Trains ``cfg.model``; writes ``out/last.pt`` (every epoch), ``out/final.pt`` (weights of the last epoch,
    EMA), ``out/metrics.jsonl`` and ``out/curves.png``.

    Args:
        cfg: the run's configuration.
        resume: continue from ``out/last.pt`` (model, EMA, optimiser, scheduler, epoch, RNG).

    Returns:
        The last metrics row.
    """
    from torch.optim.swa_utils import AveragedModel
    from torch.utils.data import DataLoader

    from detector.datasets.dataset import DetectionDataset, collate_detection
    from detector.datasets.transforms import build_train_transform

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    device = _device(cfg.device)
    # Launched by torchrun (WORLD_SIZE > 1): PyTorch DDP, one process per GPU (gloo on CPU); rank 0 writes files.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        import torch.distributed as dist

        use_cuda = device.type == "cuda"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    is_main = rank == 0
    _seed_everything(cfg.seed)

    ckpt = None
    if resume:
        if not last.is_file():
            raise WeightsError(f"--resume: no checkpoint at {last}")
        ckpt = load_checkpoint(last)
        if ckpt.get("kind") != "checkpoint":
            raise WeightsError(f"{last} is a weights file, not a training checkpoint")
        stored = dict(ckpt["train_config"])
        stored.update(epochs=cfg.epochs, progress=cfg.progress)  # the schedule length may be extended on resume
        cfg = TrainConfig(**stored)
        model: RNNPoolFace = RNNPoolFace(RNNPoolFaceConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
    else:
        model = build_model(cfg.model, **({"input_size": tuple(cfg.input_size)} if cfg.input_size else {}))
        if cfg.init_weights:
            init_model, _ = load_model(cfg.init_weights)
            skipped = load_matching_state(model, init_model.state_dict())
            log.info("initialised from %s%s", cfg.init_weights, f" (not loaded: {', '.join(skipped)})" if skipped else "")
        for stale in ("metrics.jsonl", "best.pt"):  # of an earlier run in the same folder
            if is_main and (out / stale).exists():
                (out / stale).unlink()
    model.to(device)
    mcfg = model.config

    if cfg.face_labels and model.config.class_names != ("face",):
        raise ValueError(f"--face-labels trains a one-class face model; {mcfg.name} detects {list(mcfg.class_names)} "
                         "(use e.g. rnnpool_face_m4_face)")
    faces = {"face_labels": cfg.face_labels, "face_min_score": cfg.face_min_score}
    train_records = load_records(cfg.data, cfg.format, cfg.train_split, **faces)
    if cfg.max_train_images:
        train_records = train_records[: cfg.max_train_images]
    holdout_records: list = []
    if cfg.holdout:
        train_records, holdout_records = split_holdout(train_records, cfg.holdout, cfg.seed)
    transform = build_train_transform(mcfg.input_size, grayscale=mcfg.grayscale)
    train_set = DetectionDataset(train_records, transform, cache_max_side=cfg.cache_max_side,
                                 grayscale_source=mcfg.grayscale)
    train_set.warm_cache(progress=cfg.progress and is_main)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(train_set) > cfg.batch_size, num_workers=cfg.num_workers,
                        collate_fn=collate_detection, generator=generator, persistent_workers=cfg.num_workers > 0)
    eval_set = None
    if is_main and (holdout_records or cfg.val_split):
        val_records = holdout_records or load_records(cfg.data, cfg.format, cfg.val_split, **faces)
        eval_set = EvalSet.build(val_records, model, progress=cfg.progress)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases, BN, zeta/nu
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=True)
    steps_per_epoch = max(1, len(loader))
    schedule = cosine_warmup(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = AveragedModel(model, avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None
    loss_fn = MultiBoxLoss()
    if cfg.compile:
        # RNNPool's time loop is dozens of small element-wise ops; inductor fuses them (~3-5x faster on CPU).
        # In-place Module.compile keeps the state-dict keys; the EMA copy above stays eager.
        model.rnnpool.compile()
    train_model: torch.nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch = 1
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema_state_dict"):
            ema.module.load_state_dict(ckpt["ema_state_dict"])
            ema.n_averaged.fill_(int(ckpt.get("ema_n_averaged", 1)))
        torch.set_rng_state(ckpt["rng"]["torch"])
        generator.set_state(ckpt["rng"]["loader"])
        start_epoch = int(ckpt["epoch"]) + 1
        log.info("resumed from %s at epoch %d", last, start_epoch)
        if is_main:
            _truncate_metrics(out / "metrics.jsonl", start_epoch)

    row: dict[str, Any] = {}
    best_ap50 = _best_so_far(out / "best.pt") if ckpt is not None else -1.0
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(train_model, loader, optimizer, scheduler, loss_fn, device, epoch, ema,
                                    progress=cfg.progress and is_main)
        except NonFiniteLossError:
            log.error("training stopped; %s holds the last good epoch", last if last.exists() else "no checkpoint")
            raise
        row = {"epoch": epoch, **stats, "val_ap50": None}
        if not is_main:
            continue
        eval_model = ema.module if ema is not None else model
        if eval_set is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            m = evaluate(eval_model, eval_set, device, coco=False)
            row.update(val_ap50=m["ap50"], val_images_per_s=m["images_per_s"])
            if m["ap50"] > best_ap50:  # model selection on the validation (or held-out) set
                best_ap50 = m["ap50"]
                save_weights(out / "best.pt", eval_model, {
                    "epoch": epoch, "val_ap50": best_ap50, "selected_on": "holdout" if holdout_records else "val",
                    "train_config": dataclasses.asdict(cfg)})
        row["epoch_seconds"] = time.perf_counter() - t0
        # Metrics first, checkpoint second: a kill in between re-runs this epoch on resume, and the resume drops
        # the rows of epochs after the checkpoint.
        rows = _append_metrics(out / "metrics.jsonl", row)
        atomic_save({
            "format": FORMAT, "kind": "checkpoint", "model_config": mcfg.to_dict(),
            "state_dict": model.state_dict(),
            "ema_state_dict": ema.module.state_dict() if ema is not None else None,
            "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
            "train_config": dataclasses.asdict(cfg),
            "rng": {"torch": torch.get_rng_state(), "loader": generator.get_state()},
            "meta": {"epoch": epoch, "train_config": dataclasses.asdict(cfg)},
        }, last)
        plot_curves(rows, out / "curves.png")
        log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        if cfg.progress:
            ap = f", val AP50 {row['val_ap50']:.4f}" if row["val_ap50"] is not None else ""
            print(f"epoch {epoch}/{cfg.epochs}: loss {row['loss']:.4f} (cls {row['loss_cls']:.4f}, box "
                  f"{row['loss_box']:.4f}), lr {row['lr']:.4g}, {row['train_images_per_s']:.1f} img/s{ap}", flush=True)

    if distributed:
        dist.destroy_process_group()
    if not is_main:
        return row
    final_model = ema.module if ema is not None else model
    save_weights(out / "final.pt", final_model.cpu(),
                 {"epochs": cfg.epochs, "train_config": dataclasses.asdict(cfg), "last_metrics": row})
    return row
