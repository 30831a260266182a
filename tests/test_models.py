import pytest
import torch

from detector import build_model, list_models
from detector.anchors import make_anchors
from detector.complexity import count_madds, count_params
from detector.models.rnnpool_face import RNNPoolFaceConfig


def test_registry_lists_the_paper_variants():
    assert {"rnnpool_face_m4", "rnnpool_face_m4_paper", "rnnpool_face_quant", "rnnpool_face_c"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model"):
        build_model("nope")


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_every_variant_output_shapes(name, size):
    torch.manual_seed(0)
    model = build_model(name).eval()
    cfg = model.config
    w, h = cfg.input_size if size == "full" else (72, 40)
    with torch.no_grad():
        cls, box = model(torch.rand(2, cfg.in_channels, h, w) * 255)
    a = model.num_anchors(h, w)
    assert cls.shape == (2, a, cfg.num_classes)
    assert box.shape == (2, a, 4)
    assert torch.isfinite(cls).all() and torch.isfinite(box).all()
    assert make_anchors(model.feature_sizes(h, w), model.anchor_specs()).shape == (a, 4)


def test_m4_paper_matches_the_paper_layout():
    model = build_model("rnnpool_face_m4_paper")
    assert model.config.input_size == (320, 240) and model.config.in_channels == 1
    assert model.feature_sizes(240, 320) == [(30, 40), (30, 40), (15, 20), (15, 20)]
    assert [(s.stride, s.size) for s in model.anchor_specs()] == [(8, 8.0), (8, 16.0), (16, 32.0), (16, 48.0)]
    assert 54_000 <= count_params(model) <= 58_000
    assert count_madds(model, (1, 240, 320)) < 80e6


@pytest.mark.parametrize("name", ["rnnpool_face_m4", "rnnpool_face_m4_paper"])
def test_first_head_uses_maxout_background(name):
    heads = list(build_model(name).heads.values())
    per_cell = heads[0].anchors_per_cell  # 4 on the default M4 (2x2 small anchors), 1 on the paper's
    assert heads[0].cls.out_channels == per_cell * (3 + 1) and all(h.cls.out_channels == 2 for h in heads[1:])


def test_head_with_sub_cell_anchors_orders_outputs_like_the_anchors():
    from detector.nn.head import DetectionHead

    # 2x2 anchors per location, max-out 3: class channels anchor-major (3 bg + 1 fg each), then 4 deltas per anchor
    head = DetectionHead(in_channels=1, num_classes=2, maxout_background=3, kernel_size=1, anchors_per_cell=4)
    assert head.cls.out_channels == 16 and head.box.out_channels == 16
    with torch.no_grad():
        head.cls.weight.zero_()
        head.box.weight.zero_()
        head.cls.bias.copy_(torch.tensor([0.0, 5.0, 1.0, -1.0] * 4) + torch.arange(4.0).repeat_interleave(4) * 10)
        head.box.bias.copy_(torch.arange(16.0))
        head.cls.weight[3::4, 0] = 100.0  # each anchor's foreground logit grows with the feature value
    x = torch.tensor([[[[0.0, 1.0]]]])  # one row, two locations
    cls, box = head(x)
    assert cls.shape == (1, 8, 2) and box.shape == (1, 8, 4)
    # location 0: anchor s has bg = max(0, 5, 1) + 10 s, fg = -1 + 10 s; location 1 adds 100 to fg
    assert cls[0].tolist() == [[5.0 + 10 * s, -1.0 + 10 * s] for s in range(4)] + [
        [5.0 + 10 * s, 99.0 + 10 * s] for s in range(4)]
    assert box[0].tolist() == [[4.0 * s, 4.0 * s + 1, 4.0 * s + 2, 4.0 * s + 3] for s in range(4)] * 2


def test_default_m4_has_dense_small_anchors_within_the_budget():
    model = build_model("rnnpool_face_m4")
    assert model.feature_sizes(240, 320) == [(30, 40), (30, 40), (15, 20), (15, 20)]
    assert [(s.stride, s.size, s.per_cell) for s in model.anchor_specs()] == [
        (8, 8.0, 4), (8, 16.0, 1), (16, 32.0, 1), (16, 48.0, 1)]
    assert model.num_anchors(240, 320) == 1200 * 4 + 1200 + 300 * 2
    assert count_madds(model, (1, 240, 320)) <= 70e6


def test_config_round_trip_and_overrides():
    model = build_model("rnnpool_face_quant", class_names=("head", "face"), input_size=(64, 48))
    cfg = model.config
    assert cfg.num_classes == 3 and cfg.input_size == (64, 48)
    assert RNNPoolFaceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config"):
        RNNPoolFaceConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_madds_count_the_heads_stacked_convolution():
    from detector.nn.head import DetectionHead

    head = DetectionHead(in_channels=4, num_classes=2, maxout_background=3)  # 4 class + 4 box channels, 3x3
    assert count_madds(head, (4, 5, 6)) == (4 + 4) * 5 * 6 * 4 * 9
    assert count_madds(build_model("rnnpool_face_m4_paper"), (1, 240, 320)) == pytest.approx(75.9e6, rel=1e-3)
    assert count_madds(build_model("rnnpool_face_m4"), (1, 240, 320)) == pytest.approx(69.81e6, rel=1e-3)
