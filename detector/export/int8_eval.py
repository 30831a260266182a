"""AP50 of the float model and of its int8 reference on the same evaluation images."""

from __future__ import annotations

from typing import Sequence

import torch

from detector.datasets.records import ImageRecord
from detector.export.quantize import QuantModel
from detector.models.rnnpool_face import RNNPoolFace

__all__ = ["compare_ap"]


def compare_ap(model: RNNPoolFace, qm: QuantModel, records: Sequence[ImageRecord],
               resize: str = "area") -> dict[str, float]:
    """``{"float_ap50", "int8_ap50", "images"}`` on ``records`` (VOC AP50, the paper's area resize by default).

    Both go through :func:`detector.engine.evaluate` on one :class:`~detector.engine.EvalSet`; the int8 one with the
    integer reference (:class:`~detector.export.m4.Int8Detector`) as the network runner.
    """
    from detector.engine import EvalSet, evaluate
    from detector.export.m4 import Int8Detector

    cpu = torch.device("cpu")
    eval_set = EvalSet.build(records, model, resize=resize)
    ap_float = evaluate(model.eval(), eval_set, cpu, coco=False)["ap50"]
    ap_int8 = evaluate(model, eval_set, cpu, coco=False, runner=Int8Detector(qm, model).run_network)["ap50"]
    return {"float_ap50": float(ap_float), "int8_ap50": float(ap_int8), "images": len(records)}
