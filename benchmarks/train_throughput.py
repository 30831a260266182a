"""Training throughput (images/s) of rnnpool_face_m4 at 320x240, batch 32, on this machine's CPU cores:
the real data pipeline (cached images, albumentations), S3FD matching and loss, SGD step, EMA; eager vs
torch.compile'd RNNPool.

Usage: python benchmarks/train_throughput.py [--data ../shared/datasets/scut_head] [--steps 12] [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(records, compile_rnnpool: bool, steps: int, batch_size: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    from detector.datasets.dataset import DetectionDataset, collate_detection
    from detector.datasets.transforms import build_train_transform
    from detector.engine import cosine_warmup, train_one_epoch
    from detector.loss import MultiBoxLoss
    from detector.models import build_model

    torch.manual_seed(0)
    model = build_model("rnnpool_face_m4")
    cfg = model.config
    ds = DetectionDataset(records, build_train_transform(cfg.input_size, grayscale=True), 640, grayscale_source=True)
    ds.warm_cache(progress=False)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=1,
                        collate_fn=collate_detection)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_warmup(1000, 10))
    if compile_rnnpool:
        model.rnnpool.compile()
    loss_fn = MultiBoxLoss()
    warm = list(range(2))
    it = iter(loader)
    for _ in warm:  # warm-up (and compilation)
        train_one_epoch(model, [next(it)], opt, sched, loss_fn, torch.device("cpu"), 0, progress=False)
    batches = [next(it) for _ in range(min(steps, len(loader) - len(warm)))]
    start = time.perf_counter()
    train_one_epoch(model, batches, opt, sched, loss_fn, torch.device("cpu"), 1, progress=False)
    return len(batches) * batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "scut_head"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"dataset not found: {args.data}")
    import torch

    from benchmarks.report import write_section
    from detector.datasets.voc import load_voc

    records, _ = load_voc(args.data, "partB_train")
    records = records[: (args.steps + 3) * args.batch_size]
    rows = ["| RNNPool | images/s | epoch of 2000 images |", "| --- | ---: | ---: |"]
    for compiled in (False, True):
        rate = measure(records, compiled, args.steps, args.batch_size)
        rows.append(f"| {'torch.compile' if compiled else 'eager'} | {rate:.1f} | {2000 / rate:.0f} s |")
        print(rows[-1], flush=True)
    body = "\n".join(rows) + (
        f"\n\n{args.steps} steps of batch {args.batch_size} after 2 warm-up steps, torch threads "
        f"{torch.get_num_threads()}, one data-loader worker. `detect train --compile` compiles RNNPool only "
        "(its time loop is many small element-wise ops that inductor fuses); the convolutions stay eager.")
    if args.write:
        write_section("Training throughput", "python benchmarks/train_throughput.py --write", body)


if __name__ == "__main__":
    main()
