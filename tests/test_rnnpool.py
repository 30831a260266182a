import math

import pytest
import torch
import torch.nn.functional as F

from detector.nn import FastGRNNCell, RNNPool
from detector.nn.rnnpool import same_padding


def reference_rnnpool(pool: RNNPool, x: torch.Tensor) -> torch.Tensor:
    """Slow, obviously correct RNNPool: every patch on its own, every RNN step with the cell's forward."""
    pr, pc = pool.patch_size
    sr, sc = pool.stride
    n, c, height, width = x.shape
    out_h, top, bottom = same_padding(height, pr, sr)
    out_w, left, right = same_padding(width, pc, sc)
    xp = F.pad(x, (left, right, top, bottom))
    out = torch.zeros(n, 4 * pool.hidden_size2, out_h, out_w)

    def sweep(cell: FastGRNNCell, seq: list[torch.Tensor]) -> torch.Tensor:
        h = torch.zeros(cell.hidden_size)
        for v in seq:
            h = cell(v[None], h[None])[0]
        return h

    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                patch = xp[b, :, i * sr : i * sr + pr, j * sc : j * sc + pc]  # (C, pr, pc)
                row_summ = [sweep(pool.rnn1, [patch[:, r, k] for k in range(pc)]) for r in range(pr)]
                col_summ = [sweep(pool.rnn1, [patch[:, k, q] for k in range(pr)]) for q in range(pc)]
                out[b, :, i, j] = torch.cat([
                    sweep(pool.rnn2, row_summ), sweep(pool.rnn2, row_summ[::-1]),
                    sweep(pool.rnn2, col_summ), sweep(pool.rnn2, col_summ[::-1]),
                ])
    return out


@pytest.mark.parametrize(
    "shape, patch, stride, h1, h2",
    [
        ((2, 3, 9, 11), 4, 2, 5, 6),  # odd sizes, batch > 1 (blocked path: patch = 2 strides)
        ((1, 2, 10, 7), (4, 3), (2, 3), 4, 3),  # non-square patch and stride
        ((2, 1, 8, 8), 4, 4, 3, 3),  # stride == patch (blocked, one block)
        ((1, 4, 13, 6), (3, 5), (2, 1), 4, 2),  # stride < patch in both directions
        ((1, 2, 7, 9), 2, 3, 3, 2),  # stride > patch: pixels between patches are skipped
        ((3, 2, 17, 11), 9, 3, 3, 4),  # blocked, three blocks per patch
        ((1, 4, 12, 20), 8, 4, 16, 16),  # the RNNPool-Face geometry (8 / 4), hidden 16
    ],
)
def test_matches_per_patch_reference(shape, patch, stride, h1, h2):
    torch.manual_seed(0)
    pool = RNNPool(shape[1], h1, h2, patch, stride)
    with torch.no_grad():  # non-trivial weights so that every term matters
        for p in pool.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(shape)
    with torch.no_grad():
        fast = pool(x)
        ref = reference_rnnpool(pool, x)
    assert fast.shape == (shape[0], 4 * h2, math.ceil(shape[2] / pool.stride[0]), math.ceil(shape[3] / pool.stride[1]))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    (pr, pc), (sr, sc) = pool.patch_size, pool.stride
    if pr == pc and sr == sc and pr % sr == 0:  # the blocked path ran; the windowed one agrees too
        with torch.no_grad():
            torch.testing.assert_close(pool._forward_windows(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, patch, stride", [((2, 3, 9, 11), 4, 2), ((1, 2, 12, 9), 6, 2), ((2, 4, 16, 24), 8, 4)])
def test_blocked_path_is_exact_in_float64_and_has_the_same_gradients(shape, patch, stride):
    # In float64 rounding vanishes: the blocked path (slab steps, sigmoid form of tanh, scaled state) computes the
    # same function as the windowed one, values and gradients.
    torch.manual_seed(0)
    pool = RNNPool(shape[1], 5, 6, patch, stride).double()
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for forward in (pool._forward_windows, pool._forward_blocked):
        pool.zero_grad()
        x.grad = None
        out = forward(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in pool.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_inference_uses_the_blocked_path_and_training_the_windowed_one(monkeypatch):
    pool = RNNPool(4, 8, 8, 8, 4)
    x = torch.randn(2, 4, 16, 20)
    calls = []
    for name in ("_forward_blocked", "_forward_windows"):
        original = getattr(RNNPool, name)
        monkeypatch.setattr(RNNPool, name, lambda self, x, f=original, n=name: calls.append(n) or f(self, x))
    with torch.inference_mode():
        pool(x)
    with torch.no_grad():
        pool(x)
    pool(x).sum().backward()
    assert calls == ["_forward_blocked", "_forward_blocked", "_forward_windows"]
    assert all(p.grad is not None for p in pool.parameters())
    RNNPool(4, 8, 8, (8, 6), 4)(x)  # other geometries: windowed
    with torch.no_grad():
        RNNPool(4, 8, 8, (8, 6), 4)(x)
    assert calls[3:] == ["_forward_windows", "_forward_windows"]


def test_blocked_path_after_inference_mode_still_trains():
    # The cached geometry indices are created outside inference mode, so that autograd through the blocked path
    # after an inference call cached them can save them for backward.
    pool = RNNPool(4, 8, 8, 8, 4)
    x = torch.randn(2, 4, 16, 20)
    with torch.inference_mode():
        pool(x)
    pool._forward_blocked(x).sum().backward()
    assert all(p.grad is not None for p in pool.parameters())


def test_onnx_form_of_the_blocked_path_matches_eager(monkeypatch):
    # The graph exported to ONNX (tanh gates, Gemm over [x, state]) is the same function as the eager one.
    torch.manual_seed(0)
    pool = RNNPool(4, 16, 16, 8, 4)
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(1, 4, 24, 32)
    with torch.no_grad():
        eager = pool(x)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        exported_form = pool(x)
    torch.testing.assert_close(exported_form, eager, atol=1e-5, rtol=1e-5)


def test_stem_geometry_160x120_to_40x30():
    assert same_padding(120, 8, 4) == (30, 2, 2)
    assert same_padding(160, 8, 4) == (40, 2, 2)
    pool = RNNPool(4, 16, 16, 8, 4)
    assert pool(torch.zeros(1, 4, 120, 160)).shape == (1, 64, 30, 40)
    assert pool.output_size(120, 160) == (30, 40)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    pool = RNNPool(3, 4, 5, (4, 3), 2)
    pool(torch.randn(2, 3, 9, 8)).square().sum().backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fastgrnn_cell_parameters_and_initialisation():
    cell = FastGRNNCell(4, 6)
    shapes = {n: tuple(p.shape) for n, p in cell.named_parameters()}
    assert shapes == {"W": (6, 4), "U": (6, 6), "bias_gate": (6,), "bias_update": (6,), "zeta": (1,), "nu": (1,)}
    assert torch.sigmoid(cell.zeta).item() > 0.95 and torch.sigmoid(cell.nu).item() < 0.05
    assert torch.all(cell.bias_gate == 1) and torch.all(cell.bias_update == 1)


def test_fastgrnn_cell_formula_exact():
    cell = FastGRNNCell(1, 1)
    with torch.no_grad():
        cell.W.fill_(0.5), cell.U.fill_(-1.0), cell.bias_gate.fill_(0.0), cell.bias_update.fill_(0.0)
        cell.zeta.fill_(0.0), cell.nu.fill_(0.0)
    x, h = torch.tensor([[2.0]]), torch.tensor([[0.5]])
    pre = 0.5 * 2.0 - 1.0 * 0.5  # 0.5
    z = 1 / (1 + math.exp(-pre))
    expected = (0.5 * (1 - z) + 0.5) * math.tanh(pre) + z * 0.5
    assert cell(x, h).item() == pytest.approx(expected, abs=1e-6)


def test_madds_counts():
    pool = RNNPool(4, 16, 16, 8, 4)
    per_patch = 2 * 64 * (4 * 16 + 256) + 2 * 16 * (256 + 256)
    assert pool.madds_per_patch(120, 160) == 30 * 40 * per_patch
    assert pool.madds(120, 160) < pool.madds_per_patch(120, 160)
