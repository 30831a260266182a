"""Parameter and multiply-add counts of a model at a given input size."""

from __future__ import annotations

import torch
from torch import nn

from detector.nn import RNNPool
from detector.nn.head import DetectionHead

__all__ = ["count_madds", "count_params"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_madds(model: nn.Module, input_shape: tuple[int, int, int], per_patch_rnnpool: bool = False) -> int:
    """Multiply-adds of one forward pass at ``input_shape = (C, H, W)``.

    Counts convolutions (``out elements x in_channels / groups x kernel area``), linear layers and RNNPool (its own
    analytic count: shared row/column summaries, or per patch with ``per_patch_rnnpool``). BatchNorm (foldable),
    activations and element-wise ops are not counted, as in the papers' MAdds figures.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    def rnnpool_hook(m: RNNPool, inp, _out) -> None:
        nonlocal total
        h, w = inp[0].shape[-2:]
        total += m.madds_per_patch(h, w) if per_patch_rnnpool else m.madds(h, w)

    def head_hook(m: DetectionHead, inp, _out) -> None:
        # The head runs its two convolutions as one stacked conv (stride 1, "same" padding), not through the
        # modules, so they are counted here from the input size.
        nonlocal total
        h, w = inp[0].shape[-2:]
        for conv in (m.cls, m.box):
            kh, kw = conv.kernel_size
            total += conv.out_channels * h * w * (conv.in_channels // conv.groups) * kh * kw

    handles = []
    head_convs = {id(c) for m in model.modules() if isinstance(m, DetectionHead) for c in (m.cls, m.box)}
    for m in model.modules():
        if isinstance(m, DetectionHead):
            handles.append(m.register_forward_hook(head_hook))
        elif isinstance(m, nn.Conv2d) and id(m) not in head_convs:
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, RNNPool):
            handles.append(m.register_forward_hook(rnnpool_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
