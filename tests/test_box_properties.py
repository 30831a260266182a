"""Property tests (hypothesis) of the box math: coding round trip, IoU bounds and symmetry, NMS invariants."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.box_coder import BoxCoder
from detector.boxes import batched_nms, box_iou, cxcywh_to_xyxy, nms, xyxy_to_cxcywh

coord = st.floats(min_value=0.0, max_value=500.0, allow_nan=False, width=32)
size = st.floats(min_value=0.5, max_value=300.0, allow_nan=False, width=32)


@st.composite
def boxes_xyxy(draw, min_size=1, max_size=40, sizes=size):
    n = draw(st.integers(min_size, max_size))
    rows = [draw(st.tuples(coord, coord, sizes, sizes)) for _ in range(n)]
    t = torch.tensor(rows, dtype=torch.float32)
    return torch.cat((t[:, :2], t[:, :2] + t[:, 2:]), dim=1)


@settings(max_examples=100, deadline=None)
@given(boxes=boxes_xyxy(sizes=st.floats(1.0, 240.0, width=32)), anchors=boxes_xyxy(sizes=st.floats(4.0, 300.0, width=32)))
def test_encode_decode_round_trip(boxes, anchors):
    # Box/anchor size ratios up to 60, inside the decoder's clamp (exp(max_log_scale) = 62.5).
    n = min(len(boxes), len(anchors))
    boxes, anchors_cxcywh = boxes[:n], xyxy_to_cxcywh(anchors[:n])
    coder = BoxCoder()
    decoded = coder.decode(coder.encode(boxes, anchors_cxcywh), anchors_cxcywh)
    torch.testing.assert_close(decoded, boxes, atol=5e-3, rtol=1e-4)


@settings(max_examples=50, deadline=None)
@given(deltas=st.lists(st.floats(-1e6, 1e6, width=32), min_size=4, max_size=4))
def test_decode_of_wild_deltas_stays_finite(deltas):
    anchors = torch.tensor([[100.0, 100.0, 16.0, 16.0]])
    boxes = BoxCoder().decode(torch.tensor([deltas]), anchors)
    assert torch.isfinite(boxes).all() and torch.all(boxes[:, 2:] >= boxes[:, :2])


@settings(max_examples=100, deadline=None)
@given(a=boxes_xyxy(), b=boxes_xyxy())
def test_iou_bounds_symmetry_and_self(a, b):
    iou = box_iou(a, b)
    assert iou.shape == (len(a), len(b))
    assert torch.all(iou >= 0) and torch.all(iou <= 1 + 1e-6)
    torch.testing.assert_close(iou, box_iou(b, a).t())
    torch.testing.assert_close(box_iou(a, a).diagonal(), torch.ones(len(a)))
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(a)), a, atol=1e-3)


@settings(max_examples=100, deadline=None)
@given(boxes=boxes_xyxy(), data=st.data(), thr=st.floats(0.05, 0.95))
def test_nms_invariants(boxes, data, thr):
    scores = torch.tensor(data.draw(st.lists(st.floats(0, 1, width=32), min_size=len(boxes), max_size=len(boxes))))
    keep = nms(boxes, scores, thr)
    # Kept indices are unique, ordered by descending score, and the best box is always kept.
    assert len(set(keep.tolist())) == len(keep) and len(keep) >= 1
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])
    assert scores[keep[0]] == scores.max()
    # No two kept boxes overlap more than the threshold; every dropped box overlaps a kept, higher-scored one.
    kept_iou = box_iou(boxes[keep], boxes[keep]).fill_diagonal_(0)
    assert torch.all(kept_iou <= thr)
    dropped = sorted(set(range(len(boxes))) - set(keep.tolist()))
    if dropped:
        iou = box_iou(boxes[dropped], boxes[keep])
        assert torch.all((iou > thr).any(dim=1))
    # Idempotent: NMS of the survivors keeps them all.
    assert len(nms(boxes[keep], scores[keep], thr)) == len(keep)


@settings(max_examples=50, deadline=None)
@given(boxes=boxes_xyxy(min_size=2), data=st.data())
def test_batched_nms_never_suppresses_across_classes(boxes, data):
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000))))
    labels = torch.tensor(data.draw(st.lists(st.integers(1, 3), min_size=len(boxes), max_size=len(boxes))))
    keep = set(batched_nms(boxes, scores, labels, 0.3).tolist())
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        assert {idx[i].item() for i in nms(boxes[idx], scores[idx], 0.3).tolist()} == keep & set(idx.tolist())
