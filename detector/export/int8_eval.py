"""AP50 of the float model and of its int8 reference on the same evaluation images."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from detector.anchors import make_anchors
from detector.datasets.records import ImageRecord
from detector.export.int8_ref import run_int8
from detector.export.quantize import QuantModel
from detector.models.rnnpool_face import RNNPoolFace
from detector.postprocess import PostprocessConfig, postprocess

__all__ = ["compare_ap", "predict_int8"]

EVAL_POSTPROCESS = PostprocessConfig(score_threshold=0.01, max_detections=750)


def predict_int8(model: RNNPoolFace, qm: QuantModel, eval_set: Any) -> dict[str, Any]:
    """Detections of the int8 reference for every image of a :class:`detector.engine.EvalSet` (keyed by image id)."""
    results = {}
    for rec, x, scale in zip(eval_set.records, eval_set.inputs, eval_set.scales):
        h, w = x.shape[1:]
        anchors = make_anchors(model.feature_sizes(h, w), model.anchor_specs())
        cls_logits, box_deltas = run_int8(qm, x[0])
        results[rec.image_id] = postprocess(cls_logits, box_deltas, anchors, [scale], [(rec.width, rec.height)],
                                            model.config.class_names, EVAL_POSTPROCESS)[0]
    return results


def compare_ap(model: RNNPoolFace, qm: QuantModel, records: Sequence[ImageRecord],
               resize: str = "area") -> dict[str, float]:
    """``{"float_ap50", "int8_ap50", "images"}`` on ``records`` (VOC AP50, the paper's area resize by default)."""
    from detector.engine import EvalSet, evaluate
    from detector.evaluation import voc_ap

    eval_set = EvalSet.build(records, model, resize=resize)
    ap_float = evaluate(model.eval(), eval_set, torch.device("cpu"), coco=False)["ap50"]
    ap_int8 = float(voc_ap(eval_set.records, predict_int8(model, qm, eval_set), iou_threshold=0.5).ap)
    return {"float_ap50": float(ap_float), "int8_ap50": ap_int8, "images": len(records)}
