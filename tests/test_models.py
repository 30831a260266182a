import pytest
import torch

from detector import build_model, list_models
from detector.anchors import make_anchors
from detector.complexity import count_madds, count_params
from detector.models.rnnpool_face import RNNPoolFaceConfig


def test_registry_lists_the_paper_variants():
    assert {"rnnpool_face_m4", "rnnpool_face_quant", "rnnpool_face_c"} <= set(list_models())
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


def test_m4_matches_the_paper_layout():
    model = build_model("rnnpool_face_m4")
    assert model.config.input_size == (320, 240) and model.config.in_channels == 1
    assert model.feature_sizes(240, 320) == [(30, 40), (30, 40), (15, 20), (15, 20)]
    assert [(s.stride, s.size) for s in model.anchor_specs()] == [(8, 8.0), (8, 16.0), (16, 32.0), (16, 48.0)]
    assert 54_000 <= count_params(model) <= 58_000
    assert count_madds(model, (1, 240, 320)) < 80e6


def test_first_head_uses_maxout_background():
    model = build_model("rnnpool_face_m4")
    heads = list(model.heads.values())
    assert heads[0].cls.out_channels == 3 + 1 and all(h.cls.out_channels == 2 for h in heads[1:])


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
    assert count_madds(build_model("rnnpool_face_m4"), (1, 240, 320)) == pytest.approx(75.9e6, rel=1e-3)
