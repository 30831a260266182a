"""Post-processing: the numpy candidate path gives the detections of scoring and decoding every anchor with torch
(the previous implementation): the same boxes bit for bit, the same labels and order, scores within float32 rounding."""

import math

import numpy as np
import pytest
import torch

from synthetic_data import random_boxes
from detector.box_coder import BoxCoder
from detector.boxes import batched_nms, batched_nms_np, box_iou, box_iou_np, clip_boxes_xyxy, nms, nms_np
from detector.postprocess import PostprocessConfig, _softmax_fg, candidate_anchors, postprocess


@torch.no_grad()
def reference_postprocess(cls_logits, box_deltas, anchors_cxcywh, scales, image_sizes, config):
    """The previous implementation: softmax, threshold, top-k and decoding of all anchors in torch."""
    box_coder = BoxCoder()
    probs = cls_logits.float().softmax(dim=-1)[..., 1:]
    num_fg = probs.shape[-1]
    out = []
    for i in range(probs.shape[0]):
        flat = probs[i].reshape(-1)
        cand = torch.nonzero(flat >= config.score_threshold).flatten()
        if cand.numel() > config.pre_nms_top_k:
            cand = cand[flat[cand].topk(config.pre_nms_top_k).indices]
        scores = flat[cand]
        anchor_idx = torch.div(cand, num_fg, rounding_mode="floor")
        labels = cand % num_fg + 1
        boxes = box_coder.decode(box_deltas[i, anchor_idx].float(), anchors_cxcywh[anchor_idx])
        keep = batched_nms(boxes, scores, labels, config.nms_iou)[: config.max_detections]
        sx, sy = scales[i]
        w, h = image_sizes[i]
        boxes = boxes[keep] / torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
        boxes = clip_boxes_xyxy(boxes, w, h)
        out.append((boxes.numpy(), scores[keep].numpy(), labels[keep].numpy()))
    return out


def _outputs(seed, n=2, a=300, k=2, logit_scale=3.0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, a, k, generator=g) * logit_scale
    deltas = torch.randn(n, a, 4, generator=g) * delta_scale
    xy = torch.rand(a, 2, generator=g) * 300
    wh = torch.rand(a, 2, generator=g) * 60 + 4
    return logits, deltas, torch.cat((xy, wh), dim=1)


def _assert_identical(logits, deltas, anchors, config, scales=None, sizes=None):
    n = logits.shape[0]
    scales = scales or [(0.5, 0.5), (1.25, 0.75)][:n] + [(1.0, 1.0)] * max(0, n - 2)
    sizes = sizes or [(640, 480), (256, 320)][:n] + [(320, 240)] * max(0, n - 2)
    got = postprocess(logits, deltas, anchors, scales, sizes, ("a", "b", "c")[: logits.shape[-1] - 1], config)
    ref = reference_postprocess(logits, deltas, anchors, scales, sizes, config)
    assert len(got) == len(ref) == n
    for d, (boxes, scores, labels) in zip(got, ref):
        assert d.boxes_xyxy.dtype == np.float32 and d.scores.dtype == np.float32 and d.labels.dtype == np.int64
        # Boxes and labels bit-identical; scores are numpy's softmax, within a few ulp of torch's.
        np.testing.assert_array_equal(d.boxes_xyxy, boxes.reshape(-1, 4))
        np.testing.assert_array_equal(d.labels, labels)
        np.testing.assert_allclose(d.scores, scores, rtol=1e-6, atol=0)
    return got


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.01, 0.9])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_matches_the_all_anchor_torch_path(seed, threshold, num_classes):
    logits, deltas, anchors = _outputs(seed, k=num_classes)
    _assert_identical(logits, deltas, anchors, PostprocessConfig(score_threshold=threshold))


@pytest.mark.parametrize("threshold", [0.0, -1.0, 1.0, 1.5, 1e-30, 1e-31, 0.99, 0.995, 0.999999])
def test_extreme_thresholds(threshold):
    logits, deltas, anchors = _outputs(7, a=200, logit_scale=20.0)
    _assert_identical(logits, deltas, anchors, PostprocessConfig(score_threshold=threshold, max_detections=50))


def test_top_k_and_max_detections_truncation():
    logits, deltas, anchors = _outputs(3, a=500, logit_scale=1.0)
    got = _assert_identical(logits, deltas, anchors,
                            PostprocessConfig(score_threshold=0.05, pre_nms_top_k=37, max_detections=9))
    assert all(len(d) == 9 for d in got)


def test_scores_on_the_threshold_and_ties():
    # Logits on a coarse grid: many equal scores, some exactly at the threshold (which are kept: score >= t).
    logits, deltas, anchors = _outputs(5, a=400)
    logits = (logits * 2).round() / 2
    _assert_identical(logits, deltas, anchors, PostprocessConfig(score_threshold=0.3, pre_nms_top_k=20))
    t = float(_softmax_fg(np.array([[0.0, 1.0]], np.float32))[0, 0])  # a score that occurs exactly
    cfg = PostprocessConfig(score_threshold=t, nms_iou=1.0)
    d = postprocess(logits[:1], deltas[:1], anchors, [(1.0, 1.0)], [(1000, 1000)], ("head",), cfg)[0]
    diff = (logits[0, :, 1] - logits[0, :, 0]).numpy()
    assert (diff == 1.0).any() and len(d) == int((diff >= 1.0).sum()) and d.scores.min() == np.float32(t)
    above = float(np.nextafter(np.float32(t), np.float32(1)))  # thresholds compare in float32, like the scores
    d_above = postprocess(logits[:1], deltas[:1], anchors, [(1.0, 1.0)], [(1000, 1000)], ("head",),
                          PostprocessConfig(score_threshold=above, nms_iou=1.0))[0]
    assert len(d_above) == int((diff > 1.0).sum())


def test_non_finite_logits_and_wild_deltas():
    logits, deltas, anchors = _outputs(11, a=120, delta_scale=50.0)
    logits[0, :5, 1] = float("nan")
    logits[0, 5:10, 0] = float("nan")
    logits[0, 10:15, 1] = float("inf")
    logits[0, 15:20, 0] = -float("inf")
    logits[1, 20:25] = -float("inf")
    _assert_identical(logits, deltas, anchors, PostprocessConfig(score_threshold=0.2))


def test_empty_and_numpy_inputs():
    logits, deltas, anchors = _outputs(2, n=1)
    logits[..., 0] = 10.0  # everything background
    assert len(_assert_identical(logits, deltas, anchors, PostprocessConfig())[0]) == 0
    logits, deltas, anchors = _outputs(2, n=1)
    a = postprocess(logits.numpy(), deltas.numpy(), anchors.numpy(), [(1.0, 1.0)], [(320, 240)], ("head",))[0]
    b = postprocess(logits, deltas, anchors, [(1.0, 1.0)], [(320, 240)], ("head",))[0]
    np.testing.assert_array_equal(a.boxes_xyxy, b.boxes_xyxy)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_small_exact_example():
    # Two anchors over the same box and one elsewhere: NMS keeps the better of the pair.
    logits = torch.tensor([[[0.0, 2.0], [0.0, 1.0], [0.0, math.log(0.5 / 0.5)], [0.0, -3.0]]])
    deltas = torch.zeros(1, 4, 4)
    anchors = torch.tensor([[10.0, 10.0, 8.0, 8.0], [10.0, 10.0, 8.0, 8.0], [40.0, 20.0, 16.0, 16.0],
                            [5.0, 5.0, 4.0, 4.0]])
    d = postprocess(logits, deltas, anchors, [(0.5, 0.5)], [(100, 100)], ("head",),
                    PostprocessConfig(score_threshold=0.5))[0]
    assert d.boxes_xyxy.tolist() == [[12.0, 12.0, 28.0, 28.0], [64.0, 24.0, 96.0, 56.0]]
    np.testing.assert_allclose(d.scores, [1 / (1 + math.exp(-2.0)), 0.5], rtol=1e-6)
    assert d.labels.tolist() == [1, 1] and d.image_size == (100, 100)


def test_softmax_matches_torch_within_rounding():
    logits = (np.random.default_rng(0).standard_normal((20000, 3)) * 10).astype(np.float32)
    np.testing.assert_allclose(_softmax_fg(logits), torch.from_numpy(logits).softmax(-1).numpy()[:, 1:], rtol=1e-6,
                               atol=1e-12)


def test_candidate_anchors_is_a_tight_superset():
    g = np.random.default_rng(0)
    logits = (g.standard_normal((5000, 2)) * 4).astype(np.float32)
    probs = _softmax_fg(logits)[:, 0]
    for t in (0.01, 0.3, 0.5, 0.9):
        cand = candidate_anchors(logits, t)
        passing = np.flatnonzero(probs >= t)
        assert set(passing) <= set(cand)
        assert len(cand) - len(passing) <= 0.002 * len(logits)  # only anchors within the margin are extra
    logits3 = (g.standard_normal((2000, 3)) * 4).astype(np.float32)
    probs3 = _softmax_fg(logits3)
    assert set(np.flatnonzero((probs3 >= 0.4).any(1))) <= set(candidate_anchors(logits3, 0.4))
    assert candidate_anchors(logits3, 0.0).tolist() == list(range(2000))


@pytest.mark.parametrize("seed", range(5))
def test_numpy_box_ops_are_bit_identical(seed):
    boxes, scores, g = random_boxes(seed)
    boxes[3] = boxes[3, [2, 3, 0, 1]]  # an inverted box
    labels = torch.randint(1, 3, (60,), generator=g)
    np.testing.assert_array_equal(box_iou_np(boxes.numpy(), boxes[:7].numpy()), box_iou(boxes, boxes[:7]).numpy())
    big = torch.cat((boxes,) * 20)  # the column-wise branch for large inputs
    np.testing.assert_array_equal(box_iou_np(big.numpy(), big.numpy()), box_iou(big, big).numpy())
    assert nms_np(boxes.numpy(), scores.numpy(), 0.3).tolist() == nms(boxes, scores, 0.3).tolist()
    assert (batched_nms_np(boxes.numpy(), scores.numpy(), labels.numpy(), 0.3).tolist()
            == batched_nms(boxes, scores, labels, 0.3).tolist())
    assert nms_np(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.3).tolist() == []
    assert nms_np(boxes[:1].numpy(), scores[:1].numpy(), 0.3).tolist() == [0]


def test_decode_np_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 1.0, 5.0, 5.0])
    deltas[:10, 2:] = 1e6  # clamped by max_log_scale
    anchors = torch.rand(5000, 4, generator=g) * 200 + 1
    coder = BoxCoder()
    expected = coder.decode(deltas, anchors).numpy()
    np.testing.assert_array_equal(coder.decode_np(deltas.numpy(), anchors.numpy()), expected)
