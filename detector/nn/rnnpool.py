"""FastGRNN cells and the RNNPool operator (Saha et al., NeurIPS 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FastGRNNCell", "RNNPool", "pair", "same_padding"]


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; a ``(rows, cols)`` pair is returned as a tuple."""
    if isinstance(value, int):
        return value, value
    rows, cols = value
    return int(rows), int(cols)


def same_padding(size: int, patch: int, stride: int) -> tuple[int, int, int]:
    """Padding of one spatial axis so that RNNPool outputs ``ceil(size / stride)`` patches.

    The patches are centred on the cells of a stride-``stride`` grid: the total padding
    ``(out - 1) * stride + patch - size`` (never negative) is split as ``(total // 2, total - total // 2)``.
    For the RNNPool-Face stems (size 120 or 160, patch 8, stride 4) that is 2 zero rows/columns on each side.

    Returns:
        ``(out, pad_before, pad_after)``.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + patch - size, 0)
    return out, total // 2, total - total // 2


def _windows(x: Tensor, dim: int, size: int, step: int, count: int) -> Tensor:
    """``count`` windows of ``size`` elements every ``step`` along ``dim``: that axis becomes ``(count, size)``.

    A gather rather than ``Tensor.unfold``, so that the graph exports to ONNX.
    """
    idx = (torch.arange(count, device=x.device)[:, None] * step + torch.arange(size, device=x.device)).flatten()
    return x.index_select(dim, idx).unflatten(dim, (count, size))


class FastGRNNCell(nn.Module):
    """FastGRNN cell (Kusupati et al., 2018) with shared ``W``/``U`` for the gate and the update.

    ``pre = W x + U h``, ``z = sigmoid(pre + bias_gate)``, ``c = tanh(pre + bias_update)``,
    ``h' = (sigmoid(zeta) * (1 - z) + sigmoid(nu)) * c + z * h``, starting from ``h = 0``.

    Args:
        input_size: features per time step.
        hidden_size: state size.
        zeta_init: initial ``zeta`` (``sigmoid(4) = 0.982``: the update starts nearly unscaled).
        nu_init: initial ``nu`` (``sigmoid(-4) = 0.018``).
        init_std: standard deviation of the normal initialisation of ``W`` and ``U``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        zeta_init: float = 4.0,
        nu_init: float = -4.0,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.W = nn.Parameter(torch.randn(hidden_size, input_size) * init_std)
        self.U = nn.Parameter(torch.randn(hidden_size, hidden_size) * init_std)
        self.bias_gate = nn.Parameter(torch.ones(hidden_size))
        self.bias_update = nn.Parameter(torch.ones(hidden_size))
        self.zeta = nn.Parameter(torch.tensor([zeta_init]))
        self.nu = nn.Parameter(torch.tensor([nu_init]))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step: ``x`` ``(B, input_size)``, ``h`` ``(B, hidden_size)`` -> ``h'`` ``(B, hidden_size)``."""
        return self.step(x @ self.W.t(), h)

    def step(self, wx: Tensor, h: Tensor | None) -> Tensor:
        """One step from a precomputed ``W x`` ``(B, hidden)``; ``h=None`` means the zero state."""
        pre = wx if h is None else wx + h @ self.U.t()
        z = torch.sigmoid(pre + self.bias_gate)
        c = torch.tanh(pre + self.bias_update)
        h_new = (torch.sigmoid(self.zeta) * (1 - z) + torch.sigmoid(self.nu)) * c
        return h_new if h is None else h_new + z * h

    def run(self, wx_seq: Tensor) -> Tensor:
        """Runs over a sequence whose input projection ``W x`` is already computed.

        Args:
            wx_seq: ``(T, B, hidden)`` = ``W x_t`` for each step, in the order the cell reads them.

        Returns:
            Final state ``(B, hidden)``.
        """
        h: Tensor | None = None
        for t in range(wx_seq.shape[0]):
            h = self.step(wx_seq[t], h)
        assert h is not None
        return h


class RNNPool(nn.Module):
    """RNNPool: summarises every ``rows x cols`` patch of a feature map with two FastGRNNs.

    For each patch, ``rnn1`` reads each row left to right and ``rnn2`` reads those row summaries top to bottom
    (forward) and bottom to top (backward); likewise ``rnn1`` reads each column top to bottom and ``rnn2`` reads the
    column summaries left to right and right to left. Output channels are ``[rows-fwd, rows-bwd, cols-fwd, cols-bwd]``,
    each ``hidden_size2`` wide.

    Borders: the input is zero-padded as in :func:`same_padding`, so the output is ``ceil(H / stride_rows)`` x
    ``ceil(W / stride_cols)`` and patch ``(i, j)`` is centred on output cell ``(i, j)`` (160x120 -> 40x30 with 8x8
    patches at stride 4: 2 zero pixels on each side).

    Implementation: exact, vectorised over the batch and all patches, looping only over time steps. When patches
    overlap (stride < patch) vertically adjacent patches read the same row segments, so ``rnn1`` runs once per
    (padded row, patch column) and once per (patch row, padded column), and ``rnn2`` consumes those shared summaries.

    Args:
        in_channels: ``C``.
        hidden_size1: ``rnn1`` state size ``h1``.
        hidden_size2: ``rnn2`` state size ``h2``.
        patch_size: int or ``(rows, cols)``.
        stride: int or ``(rows, cols)``.

    Shape:
        ``(N, C, H, W)`` -> ``(N, 4 * hidden_size2, ceil(H / stride_rows), ceil(W / stride_cols))``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_size1: int,
        hidden_size2: int,
        patch_size: int | tuple[int, int],
        stride: int | tuple[int, int],
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_size1 = hidden_size1
        self.hidden_size2 = hidden_size2
        self.patch_size = pair(patch_size)
        self.stride = pair(stride)
        self.rnn1 = FastGRNNCell(in_channels, hidden_size1)
        self.rnn2 = FastGRNNCell(hidden_size1, hidden_size2)

    @property
    def out_channels(self) -> int:
        return 4 * self.hidden_size2

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output ``(H', W')`` for an ``H x W`` input."""
        return (same_padding(height, self.patch_size[0], self.stride[0])[0],
                same_padding(width, self.patch_size[1], self.stride[1])[0])

    def forward(self, x: Tensor) -> Tensor:
        pr, pc = self.patch_size
        sr, sc = self.stride
        n, _, height, width = x.shape
        out_h, top, bottom = same_padding(height, pr, sr)
        out_w, left, right = same_padding(width, pc, sc)
        x = F.pad(x, (left, right, top, bottom))
        # rnn1's input projection, once per pixel: (N, Hp, Wp, h1).
        wx = torch.einsum("nchw,kc->nhwk", x, self.rnn1.W)
        h1 = self.hidden_size1

        # Rows: rnn1 over each row segment (time = pc columns) of every padded row and patch column.
        seg = _windows(wx[:, : (out_h - 1) * sr + pr], 2, pc, sc, out_w)  # (N, Hr, W', pc, h1)
        rows = self.rnn1.run(seg.permute(3, 0, 1, 2, 4).reshape(pc, -1, h1)).view(n, -1, out_w, h1)
        # Columns: rnn1 down each column segment (time = pr rows) of every patch row and padded column.
        seg = _windows(wx[:, :, : (out_w - 1) * sc + pc], 1, pr, sr, out_h)  # (N, H', pr, Wc, h1)
        cols = self.rnn1.run(seg.permute(2, 0, 1, 3, 4).reshape(pr, -1, h1)).view(n, out_h, -1, h1)

        # rnn2 over the pr row summaries (time = rows) and the pc column summaries (time = cols) of each patch.
        row_seq = _windows(rows, 1, pr, sr, out_h)  # (N, H', pr, W', h1)
        col_seq = _windows(cols, 2, pc, sc, out_w)  # (N, H', W', pc, h1)
        row_seq = row_seq.permute(2, 0, 1, 3, 4).reshape(pr, -1, h1) @ self.rnn2.W.t()
        col_seq = col_seq.permute(3, 0, 1, 2, 4).reshape(pc, -1, h1) @ self.rnn2.W.t()
        if pr == pc:  # one loop for all four sweeps
            b = row_seq.shape[1]
            out = self.rnn2.run(torch.cat((row_seq, row_seq.flip(0), col_seq, col_seq.flip(0)), dim=1))
            parts = out.split(b, dim=0)
        else:
            b = row_seq.shape[1]
            parts = (*self.rnn2.run(torch.cat((row_seq, row_seq.flip(0)), dim=1)).split(b, dim=0),
                     *self.rnn2.run(torch.cat((col_seq, col_seq.flip(0)), dim=1)).split(b, dim=0))
        out = torch.cat(parts, dim=1).view(n, out_h, out_w, self.out_channels)
        return out.permute(0, 3, 1, 2).contiguous()

    def madds(self, height: int, width: int) -> int:
        """Multiply-adds of this implementation on an ``H x W`` input (shared row/column summaries).

        Counts ``W x`` once per padded pixel, ``U h`` for every step after the first, ``rnn2``'s ``W`` and ``U``.
        """
        pr, pc = self.patch_size
        sr, sc = self.stride
        out_h, top, bottom = same_padding(height, pr, sr)
        out_w, left, right = same_padding(width, pc, sc)
        rows_used = (out_h - 1) * sr + pr
        cols_used = (out_w - 1) * sc + pc
        c, h1, h2 = self.in_channels, self.hidden_size1, self.hidden_size2
        m = (height + top + bottom) * (width + left + right) * c * h1  # W x per pixel
        m += rows_used * out_w * (pc - 1) * h1 * h1  # U h along row segments
        m += out_h * cols_used * (pr - 1) * h1 * h1  # U h along column segments
        patches = out_h * out_w
        m += patches * 2 * (pr + pc) * h1 * h2  # rnn2 W x, four sweeps
        m += patches * 2 * ((pr - 1) + (pc - 1)) * h2 * h2  # rnn2 U h
        return m

    def madds_per_patch(self, height: int, width: int) -> int:
        """Multiply-adds when every patch is processed independently (the paper's formulation)."""
        pr, pc = self.patch_size
        c, h1, h2 = self.in_channels, self.hidden_size1, self.hidden_size2
        per_patch = 2 * pr * pc * (c * h1 + h1 * h1) + 2 * (pr + pc) * (h1 * h2 + h2 * h2)
        out_h, out_w = self.output_size(height, width)
        return out_h * out_w * per_patch
