import torch

from detector import build_model
from detector.anchors import AnchorSpec, make_anchors
from detector.boxes import cxcywh_to_xyxy
from detector.loss import MultiBoxLoss, assign_targets
from detector.matching import IGNORE, NEGATIVE, MatcherConfig, match_anchors


def _grid_anchors():
    # 4x4 grid of 8 px anchors on stride 8: a 32x32 input.
    return make_anchors([(4, 4)], [AnchorSpec(stride=8, size=8.0)])


def test_stage_one_threshold_and_best_anchor():
    anchors = cxcywh_to_xyxy(_grid_anchors())
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [17.0, 17.0, 20.0, 20.0]])  # exact anchor 0; tiny box (IoU 9/64)
    matched = match_anchors(anchors, boxes)
    assert matched[0] == 0
    assert matched[10] == 1  # the tiny box still gets its best anchor (IoU 0.14 < 0.35)
    assert (matched >= 0).sum() == 2


def test_stage_two_compensates_small_faces():
    anchors = cxcywh_to_xyxy(_grid_anchors())
    cfg = MatcherConfig(positive_iou=0.24)
    # Box 0 (16x16) overlaps anchors 0, 1, 4, 5 at IoU 0.25 each: 4 anchors in stage one. Box 1 (8x8, exactly
    # anchor 15) gets 1. Mean 2.5 -> N = 2; box 1's other anchors have IoU 0, so stage two finds nothing.
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [24.0, 24.0, 32.0, 32.0]])
    matched = match_anchors(anchors, boxes, config=cfg)
    assert sorted(torch.nonzero(matched == 0).flatten().tolist()) == [0, 1, 4, 5]
    assert torch.nonzero(matched == 1).flatten().tolist() == [15]
    # Box 1 = (20, 20, 30, 30): IoU with anchor 15 = 36/128 = 0.28 (stage one: its forced best), with anchors 11
    # and 14 = 24/140 = 0.171 (a tie), with anchor 10 = 16/148 = 0.108. Stage two adds one of the two 0.171 anchors.
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [20.0, 20.0, 30.0, 30.0]])
    matched = match_anchors(anchors, boxes, config=cfg)
    ones = sorted(torch.nonzero(matched == 1).flatten().tolist())
    assert ones in ([11, 15], [14, 15])


def test_ignore_regions():
    anchors = cxcywh_to_xyxy(_grid_anchors())
    matched = match_anchors(anchors, torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 16.0, 8.0]]))
    assert matched[:2].tolist() == [IGNORE, IGNORE] and (matched[2:] == NEGATIVE).all()


def test_zero_face_image_gives_zero_box_loss_and_finite_class_loss():
    anchors = _grid_anchors()
    loss_fn = MultiBoxLoss()
    cls = torch.randn(1, 16, 2, requires_grad=True)
    box = torch.randn(1, 16, 4, requires_grad=True)
    targets = [{"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = loss_fn(cls, box, anchors, targets)
    assert out.num_pos == 0 and out.loss_box.item() == 0.0 and torch.isfinite(out.loss_cls)
    out.loss.backward()
    assert box.grad.abs().sum() == 0 and cls.grad.abs().sum() > 0


def test_hard_negative_mining_keeps_three_per_positive():
    anchors = _grid_anchors()
    targets = [{"boxes_xyxy": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([1])}]
    labels, _ = assign_targets(anchors, targets, MatcherConfig())
    assert (labels > 0).sum() == 1
    # Uniform logits: CE = log 2 per anchor; positives 1 + negatives 3 -> 4 * log 2 / 1.
    cls = torch.zeros(1, 16, 2)
    out = MultiBoxLoss()(cls, torch.zeros(1, 16, 4), anchors, targets)
    assert abs(out.loss_cls.item() - 4 * torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert out.loss_box.item() == 0.0  # the box is exactly its anchor


def test_loss_falls_when_overfitting_two_synthetic_images():
    torch.manual_seed(0)
    model = build_model("rnnpool_face_m4", input_size=(96, 64)).train()
    h, w = 64, 96
    anchors = make_anchors(model.feature_sizes(h, w), model.anchor_specs())
    images = torch.full((2, 1, h, w), 30.0)
    targets = []
    for i, (x0, y0, s) in enumerate([(10, 12, 16), (50, 20, 24)]):
        images[i, :, y0 : y0 + s, x0 : x0 + s] = 220.0
        targets.append({"boxes_xyxy": torch.tensor([[x0, y0, x0 + s, y0 + s]], dtype=torch.float32),
                        "labels": torch.tensor([1])})
    loss_fn = MultiBoxLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = loss_fn(*model(images), anchors, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
