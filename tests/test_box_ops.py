import torch
import pytest

from detector.anchors import AnchorSpec, make_anchors
from detector.box_coder import BoxCoder
from synthetic_data import random_boxes
from detector.boxes import batched_nms, box_area, box_iou, clip_boxes_xyxy, cxcywh_to_xyxy, nms, xyxy_to_cxcywh


def test_format_conversion_exact():
    b = torch.tensor([[0.0, 0.0, 10.0, 20.0], [2.0, 4.0, 6.0, 6.0]])
    c = xyxy_to_cxcywh(b)
    assert c.tolist() == [[5.0, 10.0, 10.0, 20.0], [4.0, 5.0, 4.0, 2.0]]
    assert cxcywh_to_xyxy(c).tolist() == b.tolist()


def test_iou_and_area_exact():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 8.0]])
    assert box_area(b).tolist() == [100.0, 100.0, 100.0, 0.0]
    assert box_iou(a, b).tolist() == [[pytest.approx(50 / 150), 0.0, 1.0, 0.0]]
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 4)


def test_clip():
    b = torch.tensor([[-5.0, -1.0, 50.0, 8.0]])
    assert clip_boxes_xyxy(b, 40, 6).tolist() == [[0.0, 0.0, 40.0, 6.0]]


def test_anchors_tiny_config_exact():
    anchors = make_anchors([(2, 3), (1, 1)], [AnchorSpec(stride=4, size=8.0), AnchorSpec(stride=8, size=16.0)])
    assert anchors.tolist() == [
        [2.0, 2.0, 8.0, 8.0], [6.0, 2.0, 8.0, 8.0], [10.0, 2.0, 8.0, 8.0],
        [2.0, 6.0, 8.0, 8.0], [6.0, 6.0, 8.0, 8.0], [10.0, 6.0, 8.0, 8.0],
        [4.0, 4.0, 16.0, 16.0],
    ]


def test_sub_cell_anchors_exact():
    # 2x2 anchors per stride-8 cell: centres on the cell's 4 px sub-grid, a cell's four anchors consecutive
    anchors = make_anchors([(1, 2)], [AnchorSpec(stride=8, size=8.0, per_side=2)])
    assert anchors.tolist() == [
        [2.0, 2.0, 8.0, 8.0], [6.0, 2.0, 8.0, 8.0], [2.0, 6.0, 8.0, 8.0], [6.0, 6.0, 8.0, 8.0],
        [10.0, 2.0, 8.0, 8.0], [14.0, 2.0, 8.0, 8.0], [10.0, 6.0, 8.0, 8.0], [14.0, 6.0, 8.0, 8.0],
    ]
    assert AnchorSpec(stride=8, size=8.0, per_side=3).per_cell == 9
    three = make_anchors([(1, 1)], [AnchorSpec(stride=6, size=4.0, per_side=3)])
    assert three[:, 0].tolist() == [1.0, 3.0, 5.0] * 3 and three[:, 1].tolist() == [1.0] * 3 + [3.0] * 3 + [5.0] * 3


def test_box_coder_exact_and_round_trip():
    coder = BoxCoder()
    anchors = torch.tensor([[10.0, 10.0, 8.0, 8.0]])
    boxes = torch.tensor([[7.2, 6.4, 15.2, 22.4]])  # cx 11.2, cy 14.4, w 8, h 16
    deltas = coder.encode(boxes, anchors)
    torch.testing.assert_close(deltas, torch.tensor([[1.5, 5.5, 0.0, 5 * torch.log(torch.tensor(2.0)).item()]]))
    torch.manual_seed(0)
    anchors = torch.rand(50, 4) * 40 + 1
    boxes = cxcywh_to_xyxy(torch.rand(50, 4) * 30 + 1)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-4, rtol=1e-5)


def brute_force_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = []
    for i in order:
        if all(box_iou(boxes[i : i + 1], boxes[k : k + 1]).item() <= thr for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_brute_force(seed):
    boxes, scores, _ = random_boxes(seed)
    assert nms(boxes, scores, 0.3).tolist() == brute_force_nms(boxes, scores, 0.3)


def test_nms_empty_and_batched():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.3).numel() == 0
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([1, 1, 2]), 0.3).tolist() == [0, 2]
