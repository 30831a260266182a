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
        ((2, 3, 9, 11), 4, 2, 5, 6),  # odd sizes, batch > 1
        ((1, 2, 10, 7), (4, 3), (2, 3), 4, 3),  # non-square patch and stride
        ((2, 1, 8, 8), 4, 4, 3, 3),  # stride == patch
        ((1, 4, 13, 6), (3, 5), (2, 1), 4, 2),  # stride < patch in both directions
        ((1, 2, 7, 9), 2, 3, 3, 2),  # stride > patch: pixels between patches are skipped
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
