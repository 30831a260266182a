"""FastGRNN cells and the RNNPool operator (Saha et al., NeurIPS 2020)."""

from __future__ import annotations

import functools
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

    For inference (autograd off, or an ONNX export), when the patch is square and a multiple ``m`` of a square stride
    ``s`` (all RNNPool-Face variants: 8 and 4), :meth:`_forward_blocked` cuts the padded map into ``s x s`` blocks, so
    that every time step reads one contiguous slab (the same pixel offset in every block) and the state moves on to
    the neighbouring block every ``s`` steps: no gathers of overlapping windows, ``rnn1``'s row and column sweeps share
    one loop, and ``rnn2``'s four sweeps another (eagerly about 1.7x faster). Training and other geometries use
    :meth:`_forward_windows`, which ``torch.compile`` turns into faster training kernels. Both compute the same
    function (float rounding aside).

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
        inference = not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export()
        if inference and pr == pc and sr == sc and pr % sr == 0:
            return self._forward_blocked(x)
        return self._forward_windows(x)

    def _forward_windows(self, x: Tensor) -> Tensor:
        """Any geometry: overlapping windows gathered per time step."""
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

    def _forward_blocked(self, x: Tensor) -> Tensor:
        """Square patch ``p = m * s`` at square stride ``s``, with the padded map cut into ``s x s`` blocks.

        The padded map has ``Rb = out_h + m - 1`` block rows and ``Cb = out_w + m - 1`` block columns. ``rnn1``'s
        row sweep of the segment starting at block column ``j`` reads, at step ``t = b * s + o``, column offset ``o``
        of block column ``j + b``: every step reads offset ``o`` of *all* blocks, and after each ``s`` steps the
        states move one block on, so that the state of segment ``j`` sits at block ``j + b``. Column sweeps likewise,
        along block rows; ``rnn2``'s sweeps over the row and column summaries likewise, the backward ones moving the
        other way. Inputs, moves and the output are row gathers with constant indices (:func:`_block_indices`).
        States at the map edges that no patch reads are advanced too (about 3% more work at 160x120).

        Returns the output as a channels-last strided view of ``(N, 4 * h2, H', W')`` (the following convolution is
        at least as fast on it as on a contiguous copy).
        """
        s = self.stride[0]
        m = self.patch_size[0] // s
        n, c, height, width = x.shape
        out_h, top, bottom = same_padding(height, m * s, s)
        out_w, left, right = same_padding(width, m * s, s)
        in1, shift1, in2, shift2, gather_out = _block_indices(n, out_h, out_w, m, s, x.device)
        pixels = F.pad(x, (left, right, top, bottom)).permute(0, 2, 3, 1).contiguous().view(-1, c)  # (N*Hp*Wp, C)
        out1 = _fastgrnn_blocks(self.rnn1, pixels, in1, m, shift1)
        out2 = _fastgrnn_blocks(self.rnn2, out1, in2, m, shift2)
        out = out2.index_select(0, gather_out).view(n, out_h, out_w, self.out_channels)
        return out.permute(0, 3, 1, 2)

    def madds(self, height: int, width: int) -> int:
        """Multiply-adds of the shared row/column summaries algorithm on an ``H x W`` input (:meth:`_forward_windows`;
        the blocked implementation adds about 3% for states at the map edges that no patch reads).

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


def _block_indices(
    n: int, out_h: int, out_w: int, m: int, s: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row indices for :meth:`RNNPool._forward_blocked`: constants of the geometry, cached in eager mode, traced
    (and folded) under ``torch.compile`` and in an ONNX export.

    ``rnn1``'s states are ``[row sweeps (n, block row, row offset, block column) | column sweeps (n, block row,
    block column, column offset)]``; ``rnn2``'s are ``[rows forward, rows backward (n, block row, patch column) |
    columns forward, columns backward (n, patch row, block column)]``.

    Returns:
        ``in1``: ``(s, B1)`` rows of the padded ``(N * Hp * Wp, C)`` pixels: ``rnn1``'s input at step offset ``o``.
        ``shift1``: ``(B1,)`` moves ``rnn1``'s states one block on (row sweeps to the next block column, column sweeps
        to the next block row).
        ``in2``: ``(s, B2)`` rows of ``rnn1``'s final states: ``rnn2``'s input at step offset ``o`` (backward sweeps
        read offset ``s - 1 - o``).
        ``shift2``: ``(B2,)`` the same for ``rnn2``'s states; backward sweeps move to the previous block.
        ``gather_out``: the final state of every patch, in order ``(n, patch row, patch column, sweep)``.
    States that no patch owns (at an edge) are filled from a neighbour and never read.
    """
    if torch.compiler.is_compiling():
        return _make_block_indices(n, out_h, out_w, m, s, device)
    return _cached_block_indices(n, out_h, out_w, m, s, device)


@functools.lru_cache(maxsize=16)
def _cached_block_indices(
    n: int, out_h: int, out_w: int, m: int, s: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Built outside inference mode, so that training can use them after an inference call cached them.
    with torch.inference_mode(False), torch.no_grad():
        return _make_block_indices(n, out_h, out_w, m, s, device)


def _make_block_indices(
    n: int, out_h: int, out_w: int, m: int, s: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rb, cb = out_h + m - 1, out_w + m - 1
    hp, wp = rb * s, cb * s

    def ar(size: int) -> Tensor:
        return torch.arange(size, device=device)

    def fwd(t: Tensor, dim: int) -> Tensor:  # new[i] = old[i - 1]
        return torch.cat((t.narrow(dim, 0, 1), t.narrow(dim, 0, t.shape[dim] - 1)), dim)

    def bwd(t: Tensor, dim: int) -> Tensor:  # new[i] = old[i + 1]
        return torch.cat((t.narrow(dim, 1, t.shape[dim] - 1), t.narrow(dim, t.shape[dim] - 1, 1)), dim)

    o = ar(s).view(s, 1, 1, 1, 1)
    ni, bri, offi, bci = (ar(v).view(*[-1 if d == k else 1 for d in range(4)]) for k, v in enumerate((n, rb, s, cb)))
    base = ni * (hp * wp) + bri * (s * wp)
    rows_in = base + offi * wp + bci * s + o  # (s, n, rb, s, cb): row offset offi, column offset o
    cols_in = base + o * wp + bci.view(1, 1, -1, 1) * s + offi.view(1, 1, 1, -1)  # (s, n, rb, cb, s)
    in1 = torch.cat((rows_in.reshape(s, -1), cols_in.reshape(s, -1)), dim=1)
    b1 = n * rb * s * cb
    shift1 = torch.cat((fwd(ar(b1).view(-1, cb), 1).flatten(), fwd(ar(b1).view(n, rb, -1) + b1, 1).flatten()))

    o = ar(s).view(s, 1, 1, 1)
    ni, bri, pci = ar(n).view(-1, 1, 1), ar(rb).view(1, -1, 1), ar(out_w).view(1, 1, -1)
    rows_f = ((ni * rb + bri) * s + o) * cb + pci + m - 1  # summary of row (bri, o), segment pci: (s, n, rb, out_w)
    rows_b = ((ni * rb + bri) * s + (s - 1 - o)) * cb + pci + m - 1
    pri, bci = ar(out_h).view(1, -1, 1), ar(cb).view(1, 1, -1)
    cols_f = b1 + ((ni * rb + pri + m - 1) * cb + bci) * s + o  # summary of column (bci, o), patch row pri
    cols_b = b1 + ((ni * rb + pri + m - 1) * cb + bci) * s + (s - 1 - o)
    in2 = torch.cat([t.reshape(s, -1) for t in (rows_f, rows_b, cols_f, cols_b)], dim=1)
    nr, nc = n * rb * out_w, n * out_h * cb
    rf, rbk = ar(nr).view(n, rb, out_w), ar(nr).view(n, rb, out_w) + nr
    cf, cbk = ar(nc).view(n, out_h, cb) + 2 * nr, ar(nc).view(n, out_h, cb) + 2 * nr + nc
    shift2 = torch.cat((fwd(rf, 1).flatten(), bwd(rbk, 1).flatten(), fwd(cf, 2).flatten(), bwd(cbk, 2).flatten()))
    gather_out = torch.stack((rf[:, m - 1 :], rbk[:, :out_h], cf[:, :, m - 1 :], cbk[:, :, :out_w]), dim=-1)
    return in1, shift1, in2, shift2, gather_out.flatten()


def _fastgrnn_blocks(cell: FastGRNNCell, table: Tensor, index: Tensor, m: int, shift: Tensor) -> Tensor:
    """Runs ``cell`` for ``m`` blocks of ``s`` steps, moving the states with ``shift`` between blocks.

    Args:
        cell: the FastGRNN.
        table: ``(R, input_size)`` input vectors.
        index: ``(s, B)``: the input of step ``b * s + o`` is ``table[index[o]]`` (the same for every block ``b``).
        m: blocks.
        shift: ``(B,)`` row index applied to the states after each block but the last.

    Returns:
        Final states ``(B, hidden_size)``.

    The state is kept as ``g = h / k`` with ``k = sigmoid(zeta) + sigmoid(nu)``: then
    ``h' = (sigmoid(zeta) (1 - z) + sigmoid(nu)) c + z h`` becomes ``g' = c + z (g - r c)`` with
    ``r = sigmoid(zeta) / k``, and ``U h = (k U) g``; one multiply fewer per step.

    Both gates share ``U h`` (one GEMM per step). In an ONNX export every step gathers its inputs and computes
    ``W x + bias`` per gate (``Gemm``), so that no ``(s, B, hidden)`` tensor is materialised and split (slower in
    onnxruntime). Eagerly, ``W x + bias`` is computed for all steps at once, and as torch's CPU ``tanh`` is several
    times slower than its ``sigmoid``, ``tanh(p) = 2 sigmoid(2 p) - 1`` with the update gate's ``W x + bias`` and
    ``U h`` doubled (exact in float).
    """
    s, b = index.shape
    hid = cell.hidden_size
    a = torch.sigmoid(cell.zeta)
    k = a + torch.sigmoid(cell.nu)
    r = a / k
    g: Tensor | None = None
    if torch.onnx.is_in_onnx_export():
        wt, ukt = cell.W.t(), (k * cell.U).t()
        for blk in range(m):
            if blk:
                assert g is not None
                g = g.index_select(0, shift)
            for o in range(s):
                x = table.index_select(0, index[o])
                xg = torch.addmm(cell.bias_gate, x, wt)
                xu = torch.addmm(cell.bias_update, x, wt)
                if g is None:
                    z, c = torch.sigmoid(xg), torch.tanh(xu)
                    g = c * (1 - r * z)
                else:
                    uh = torch.mm(g, ukt)
                    z = torch.sigmoid(xg + uh)
                    c = torch.tanh(xu + uh)
                    g = c + z * (g - r * c)
    else:
        flat = table.index_select(0, index.flatten())
        xg = torch.addmm(cell.bias_gate, flat, cell.W.t()).view(s, b, hid)
        xu = torch.addmm(2 * cell.bias_update, flat, 2 * cell.W.t()).view(s, b, hid)
        ukt = (k * cell.U).t()
        neg_r = -r
        for blk in range(m):
            if blk:
                assert g is not None
                g = g.index_select(0, shift)
            for o in range(s):
                if g is None:
                    z = torch.sigmoid(xg[o])
                    c = torch.sigmoid(xu[o]).mul(2).sub_(1)
                    g = c * (1 + neg_r * z)
                else:
                    uh = torch.mm(g, ukt)  # U h, shared by both gates
                    z = torch.add(xg[o], uh).sigmoid_()
                    c = torch.add(xu[o], uh, alpha=2).sigmoid_().mul(2).sub_(1)
                    g = torch.addcmul(c, z, torch.addcmul(g, c, neg_r))
    assert g is not None
    return g * k
