"""Where the AP goes, by head size: for each model, SCUT-HEAD heads binned by their side at the model's input scale,
with how well the anchors fit them and how many the model finds.

Usage: python benchmarks/head_sizes.py [--weights W [W ...]] [--split partB_val] [--limit N] [--write]

Per bin of ``sqrt(w * h)`` (pixels of the resized input, about 320x240 area):

* share: fraction of all heads;
* stage-1 matched: fraction with some anchor at IoU >= 0.35 (S3FD stage one; :class:`detector.matching.MatcherConfig`);
* median best IoU: median over heads of their best anchor IoU;
* recall: fraction covered by some detection with score >= 0.01 at IoU >= 0.5 (not one-to-one: the ceiling AP50
  could reach if the scores were perfect).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTION = "Accuracy by head size"
BINS = (0.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 48.0, float("inf"))


def _data_root() -> Path:
    env = os.environ.get("RNNPOOL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def _bin_names() -> list[str]:
    names = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        names.append(f"< {hi:g}" if lo == 0 else f"≥ {lo:g}" if hi == float("inf") else f"{lo:g}–{hi:g}")
    return names


def size_breakdown(weights: Path, data: Path, split: str, limit: int | None) -> dict[str, list[float]]:
    """Per bin: share, stage-1 matched, median best anchor IoU, recall (lists aligned with :data:`BINS`)."""
    import numpy as np
    import torch

    from detector.anchors import make_anchors
    from detector.boxes import box_iou, cxcywh_to_xyxy
    from detector.checkpoint import load_model
    from detector.datasets.voc import load_voc
    from detector.engine import EvalSet, predict
    from detector.matching import MatcherConfig

    model, _ = load_model(weights)
    records, _ = load_voc(data / "scut_head", split)
    records = records[:limit] if limit else records
    eval_set = EvalSet.build(records, model)
    preds, _ = predict(model, eval_set, torch.device("cpu"))
    sides, best, found = [], [], []
    for rec, x, (sx, sy) in zip(eval_set.records, eval_set.inputs, eval_set.scales):
        if not len(rec.boxes_xyxy):
            continue
        gt = torch.from_numpy(rec.boxes_xyxy).double()
        gt_in = gt * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)  # input-pixel frame of the anchors
        anchors = cxcywh_to_xyxy(make_anchors(model.feature_sizes(*x.shape[1:]), model.anchor_specs())).double()
        sides.append(((gt_in[:, 2] - gt_in[:, 0]) * (gt_in[:, 3] - gt_in[:, 1])).clamp(min=0).sqrt())
        best.append(box_iou(gt_in, anchors).max(dim=1).values)
        det = torch.from_numpy(np.asarray(preds[rec.image_id].boxes_xyxy, dtype=np.float64)).reshape(-1, 4)
        hit = box_iou(gt, det).max(dim=1).values >= 0.5 if len(det) else torch.zeros(len(gt), dtype=torch.bool)
        found.append(hit)
    side, iou, hit = torch.cat(sides), torch.cat(best), torch.cat(found).double()
    thr = MatcherConfig().positive_iou
    out: dict[str, list[float]] = {"share": [], "matched": [], "median_iou": [], "recall": []}
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (side >= lo) & (side < hi)
        n = int(sel.sum())
        out["share"].append(n / len(side))
        out["matched"].append(float((iou[sel] >= thr).double().mean()) if n else float("nan"))
        out["median_iou"].append(float(iou[sel].median()) if n else float("nan"))
        out["recall"].append(float(hit[sel].mean()) if n else float("nan"))
    out["total_recall"] = [float(hit.mean())]
    out["heads"] = [float(len(side))]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, nargs="+", default=[REPO / "weights" / "rnnpool_face_m4.pt"])
    p.add_argument("--split", default="partB_val")
    p.add_argument("--limit", type=int, default=None, help="first N images of the split")
    p.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = p.parse_args(argv)
    data = _data_root()
    if not (data / "scut_head").is_dir():
        print(f"SCUT-HEAD not found under {data} (set RNNPOOL_DATA)", file=sys.stderr)
        return 2
    missing = [w for w in args.weights if not w.is_file()]
    if missing:
        print(f"weights not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(2)
    results = {w: size_breakdown(w, data, args.split, args.limit) for w in args.weights}
    names = _bin_names()
    lines = []
    for w, r in results.items():
        label = w.relative_to(REPO) if w.is_relative_to(REPO) else w
        lines += [f"`{label}`: {int(r['heads'][0])} heads, recall at score ≥ 0.01 {r['total_recall'][0]:.3f}", "",
                  "| head side (px) | share of heads | stage-1 matched | median best anchor IoU "
                  "| recall at score ≥ 0.01 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for i, name in enumerate(names):
            lines.append(f"| {name} | {100 * r['share'][i]:.0f} % | {r['matched'][i]:.2f} | {r['median_iou'][i]:.2f} "
                         f"| {r['recall'][i]:.2f} |")
        lines.append("")
    body = "\n".join(lines)
    print(body)
    if args.write:
        from benchmarks.report import write_section

        cmd = "python benchmarks/head_sizes.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(SECTION, cmd.replace(" --write", "").strip(),
                      f"Heads of `{args.split}` binned by side at the model's input scale (about 320×240 area). "
                      "Recall: some detection at IoU ≥ 0.5 (not one-to-one), the ceiling of AP50.\n\n" + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
