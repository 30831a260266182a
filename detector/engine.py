"""Training and evaluation loops: :func:`train_one_epoch` and :func:`evaluate`."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from detector.anchors import make_anchors
from detector.datasets.dataset import decode_image
from detector.datasets.records import ImageRecord
from detector.detections import Detections
from detector.loss import MultiBoxLoss
from detector.models.rnnpool_face import RNNPoolFace
from detector.postprocess import PostprocessConfig, postprocess
from detector.preprocess import input_size_for

__all__ = ["EvalSet", "NonFiniteLossError", "cosine_warmup", "evaluate", "predict", "train_one_epoch"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says where."""


def cosine_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _unwrap(model: nn.Module) -> RNNPoolFace:
    return model.module if hasattr(model, "module") else model  # DDP / AveragedModel


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, list[dict[str, Any]]]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: MultiBoxLoss,
    device: torch.device,
    epoch: int,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    grad_clip: float = 10.0,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean losses, last lr and images/s.

    ``loader`` yields ``(images uint8 (N, C, H, W), targets)`` at one fixed input size with boxes in input pixels.

    Raises:
        NonFiniteLossError: on a NaN/inf loss (nothing is stepped with it).
    """
    from tqdm import tqdm

    model.train()
    net = _unwrap(model)
    anchors: dict[tuple[int, int], torch.Tensor] = {}
    sums: dict[str, float] = defaultdict(float)
    steps = images_seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True).float()
        hw = tuple(images.shape[-2:])
        if hw not in anchors:
            anchors[hw] = make_anchors(net.feature_sizes(*hw), net.anchor_specs()).to(device)
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        cls_logits, box_deltas = model(images)
        out = loss_fn(cls_logits, box_deltas, anchors[hw], targets)
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {steps} (cls {out.loss_cls.item()}, box {out.loss_box.item()}):"
                " lower the learning rate; the last good checkpoint is kept"
            )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(net)
        steps += 1
        images_seen += images.shape[0]
        sums["loss"] += out.loss.item()
        sums["loss_cls"] += out.loss_cls.item()
        sums["loss_box"] += out.loss_box.item()
        sums["num_pos"] += out.num_pos / images.shape[0]
        rate = images_seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", img_s=f"{rate:.1f}")
    elapsed = time.perf_counter() - start
    stats = {k: v / max(1, steps) for k, v in sums.items()}
    stats.update(lr=optimizer.param_groups[0]["lr"], train_images_per_s=images_seen / max(elapsed, 1e-9),
                 train_seconds=elapsed)
    return stats


@dataclass
class EvalSet:
    """Evaluation images decoded and resized once (the paper's protocol: each image resized to about the model's
    input area, aspect kept), grouped by input size so that they batch.

    Attributes:
        records: ground truth in original-image pixels.
        inputs: per record, ``(C, h, w)`` uint8 network input (RGB or gray).
        scales: per record ``(sx, sy)`` original -> input.
    """

    records: list[ImageRecord]
    inputs: list[np.ndarray]
    scales: list[tuple[float, float]]

    @classmethod
    def build(cls, records: Sequence[ImageRecord], model: RNNPoolFace, resize: str = "area",
              progress: bool = False) -> EvalSet:
        import cv2
        from tqdm import tqdm

        cfg = model.config
        inputs, scales = [], []
        for r in tqdm(records, desc="loading eval images", leave=False, disable=not progress):
            img = decode_image(r.path, grayscale=cfg.grayscale)  # RGB or (H, W, 1) gray
            h0, w0 = img.shape[:2]
            w, h = input_size_for(w0, h0, cfg, resize)
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if w < w0 else cv2.INTER_LINEAR)
            if img.ndim == 2:
                img = img[:, :, None]
            inputs.append(np.ascontiguousarray(img.transpose(2, 0, 1)))
            scales.append((w / w0, h / h0))
        return cls(list(records), inputs, scales)


@torch.no_grad()
def predict(
    model: nn.Module,
    eval_set: EvalSet,
    device: torch.device,
    config: PostprocessConfig = PostprocessConfig(score_threshold=0.01, max_detections=750),
    batch_size: int = 16,
    runner: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[dict[str, Detections], float]:
    """Runs the model on every image of ``eval_set``.

    Args:
        model: the network (its geometry gives the anchors; it computes the outputs unless ``runner`` is given).
        runner: another backend computing the raw outputs of one ``(C, h, w)`` float input, e.g.
            ``Detector.run_network`` of the ONNX or int8 backends; images then go one at a time.

    Returns:
        Detections keyed by image id (original-image pixels) and images/s (network + postprocess).
    """
    net = _unwrap(model)
    was_training = model.training
    model.eval()
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, x in enumerate(eval_set.inputs):
        groups[x.shape].append(i)
    results: dict[str, Detections] = {}
    start = time.perf_counter()
    for shape, idx in groups.items():
        anchors = make_anchors(net.feature_sizes(*shape[1:]), net.anchor_specs()).to(device)
        for b in range(0, len(idx), batch_size):
            chunk = idx[b : b + batch_size]
            if runner is None:
                x = torch.from_numpy(np.stack([eval_set.inputs[i] for i in chunk])).to(device).float()
                cls_logits, box_deltas = model(x)
            else:
                outs = [runner(eval_set.inputs[i].astype(np.float32)) for i in chunk]
                cls_logits, box_deltas = (torch.cat(t).to(device) for t in zip(*outs))
            recs = [eval_set.records[i] for i in chunk]
            dets = postprocess(cls_logits, box_deltas, anchors, [eval_set.scales[i] for i in chunk],
                               [(r.width, r.height) for r in recs], net.config.class_names, config)
            results.update({r.image_id: d for r, d in zip(recs, dets)})
    rate = len(eval_set.records) / max(time.perf_counter() - start, 1e-9)
    model.train(was_training)
    return results, rate


def evaluate(
    model: nn.Module,
    eval_set: EvalSet,
    device: torch.device,
    label: int = 1,
    coco: bool = True,
    runner: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """AP50 (VOC all-point, IoU 0.5, ignore regions honoured), COCO AP@[.5:.95]/AP50/AR and images/s.

    Returns:
        Plain numbers keyed ``ap50``, ``ap``, ``coco_ap50``, ``ar``, ``images``, ``images_per_s``, plus ``pr`` (the
        :class:`detector.evaluation.APResult` of AP50, for plots).
    """
    from detector.evaluation import coco_metrics, voc_ap

    preds, rate = predict(model, eval_set, device, runner=runner)
    ap = voc_ap(eval_set.records, preds, iou_threshold=0.5, label=label)
    out: dict[str, Any] = {"ap50": float(ap.ap), "images": len(eval_set.records), "images_per_s": rate, "pr": ap}
    if coco:
        m = coco_metrics(eval_set.records, preds, label=label)
        out.update(ap=float(m["AP"]), coco_ap50=float(m["AP50"]), ar=float(m["AR"]))
    return out
