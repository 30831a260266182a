"""Integer-only numpy reference of the int8 RNNPool-Face network; bit-exact with the C kernels in ``firmware/``.

All tensors are HWC. Arithmetic is int64 in numpy, but every value fits the C types (int8/int16 activations and
states, int32 accumulators, int64 only inside :func:`~detector.export.quantize.requant`). See
:mod:`detector.export.quantize` for the scheme.
"""

from __future__ import annotations

import numpy as np
import torch

from detector.export.quantize import (
    _LUT_STEP_SHIFT,
    LUT_SIZE,
    ConvQ,
    HeadQ,
    QuantModel,
    RnnCellQ,
    RnnPoolQ,
    requant,
    sigmoid_lut,
    tanh_lut,
)
from detector.nn.rnnpool import same_padding

__all__ = ["dequantize_heads", "run_int8", "run_int8_heads"]

_SIG = sigmoid_lut().astype(np.int64)
_TANH = tanh_lut().astype(np.int64)


def _sat(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(x, lo, hi)


def stem(img: np.ndarray, q: ConvQ) -> np.ndarray:
    """``(H, W)`` uint8 -> ``(ceil(H/2), ceil(W/2), Cout)`` int8: 3x3 stride 2 on ``2p - 255``, zero 'same'
    padding, ReLU."""
    v = img.astype(np.int64) * 2 - 255
    h, w = v.shape
    oh, ow = -(-h // 2), -(-w // 2)
    vp = np.zeros((h + 2 + 1, w + 2 + 1), np.int64)
    vp[1 : h + 1, 1 : w + 1] = v
    acc = np.zeros((oh, ow, q.weight.shape[0]), np.int64)
    for ky in range(3):
        for kx in range(3):
            tap = vp[ky : ky + 2 * oh : 2, kx : kx + 2 * ow : 2]
            acc += tap[:, :, None] * q.weight[:, ky, kx].astype(np.int64)
    acc += q.bias
    return _sat(requant(acc, q.mult, q.shift), q.lo, q.hi)


def _lut_index(pre: np.ndarray) -> np.ndarray:
    half = LUT_SIZE // 2
    return np.clip((pre + (1 << (_LUT_STEP_SHIFT - 1))) >> _LUT_STEP_SHIFT, -half, half - 1) + half


def cell_step(wx_acc: np.ndarray, h: np.ndarray, c: RnnCellQ) -> np.ndarray:
    """One FastGRNN step: ``wx_acc`` ``(..., H)`` = ``W_q x`` (accumulator units), ``h`` ``(..., H)`` int16 Q12
    -> the new state."""
    pre = requant(wx_acc + h @ c.U.astype(np.int64).T, c.u_mult, c.u_shift)
    z = _SIG[_lut_index(pre + c.bias_gate)]
    cc = _TANH[_lut_index(pre + c.bias_update)]
    g = ((c.zeta * (32768 - z) + (1 << 14)) >> 15) + c.nu
    hn = ((g * cc + (1 << 17)) >> 18) + ((z * h + (1 << 14)) >> 15)
    return _sat(hn, -32768, 32767)


def cell_run(wx_seq: np.ndarray, c: RnnCellQ) -> np.ndarray:
    """Runs a cell from the zero state over ``wx_seq`` ``(T, ..., H)`` (``W_q x`` accumulators); final state."""
    h = np.zeros(wx_seq.shape[1:], np.int64)
    for t in range(wx_seq.shape[0]):
        h = cell_step(wx_seq[t], h, c)
    return h


def wx(x: np.ndarray, c: RnnCellQ) -> np.ndarray:
    """``W_q x`` accumulators: ``x`` ``(..., I)`` int -> ``(..., H)`` int64."""
    return x.astype(np.int64) @ c.W.astype(np.int64).T


def rnnpool(x: np.ndarray, q: RnnPoolQ) -> np.ndarray:
    """``(H, W, C)`` int8 -> ``(ceil(H/4), ceil(W/4), 4 * h2)`` int8; channels [rows-fwd, rows-bwd, cols-fwd,
    cols-bwd], each patch's row and column summaries computed once per shared segment (as in the float model)."""
    p, s = q.patch, q.stride
    h, w, _ = x.shape
    oh, top, bottom = same_padding(h, p, s)
    ow, left, right = same_padding(w, p, s)
    xp = np.pad(x.astype(np.int64), ((top, bottom), (left, right), (0, 0)))
    pre = wx(xp, q.rnn1)  # (Hp, Wp, h1)
    col_idx = (np.arange(ow)[:, None] * s + np.arange(p)).ravel()
    row_idx = (np.arange(oh)[:, None] * s + np.arange(p)).ravel()
    hr = (oh - 1) * s + p
    wc = (ow - 1) * s + p
    # rnn1 along each row segment: (Hr, ow, p, h1) -> time first.
    seg = pre[:hr, col_idx].reshape(hr, ow, p, -1).transpose(2, 0, 1, 3)
    rows = cell_run(seg, q.rnn1)  # (Hr, ow, h1)
    seg = pre[row_idx, :wc].reshape(oh, p, wc, -1).transpose(1, 0, 2, 3)
    cols = cell_run(seg, q.rnn1)  # (oh, Wc, h1)
    row_pre = wx(rows, q.rnn2)[row_idx].reshape(oh, p, ow, -1).transpose(1, 0, 2, 3)  # (p, oh, ow, h2)
    col_pre = wx(cols, q.rnn2)[:, col_idx].reshape(oh, ow, p, -1).transpose(2, 0, 1, 3)
    parts = [cell_run(row_pre, q.rnn2), cell_run(row_pre[::-1], q.rnn2),
             cell_run(col_pre, q.rnn2), cell_run(col_pre[::-1], q.rnn2)]
    out = np.concatenate(parts, axis=-1)
    return _sat(requant(out, q.out_mult, q.out_shift), -128, 127)


def pointwise_acc(x: np.ndarray, q: ConvQ) -> np.ndarray:
    """1x1 convolution accumulators (bias included): ``(H, W, Cin)`` -> ``(H, W, Cout)`` int64."""
    return x.astype(np.int64) @ q.weight.astype(np.int64).T + q.bias


def pointwise(x: np.ndarray, q: ConvQ) -> np.ndarray:
    return _sat(requant(pointwise_acc(x, q), q.mult, q.shift), q.lo, q.hi)


def depthwise(x: np.ndarray, q: ConvQ) -> np.ndarray:
    """3x3 depthwise, zero 'same' padding, stride ``q.stride``: ``(H, W, C)`` -> ``(ceil(H/s), ceil(W/s), C)``."""
    s = q.stride
    h, w, c = x.shape
    oh, ow = -(-h // s), -(-w // s)
    xp = np.zeros((h + 3, w + 3, c), np.int64)
    xp[1 : h + 1, 1 : w + 1] = x
    acc = np.zeros((oh, ow, c), np.int64)
    wt = q.weight.astype(np.int64)
    for ky in range(3):
        for kx in range(3):
            acc += xp[ky : ky + s * oh : s, kx : kx + s * ow : s] * wt[:, ky, kx]
    acc += q.bias
    return _sat(requant(acc, q.mult, q.shift), q.lo, q.hi)


def head(x: np.ndarray, q: HeadQ) -> np.ndarray:
    """3x3 head convolution: ``(H, W, Cin)`` int8 -> ``(H, W, anchors * (ncls_raw + 4))`` int32 accumulators."""
    h, w, _ = x.shape
    xp = np.zeros((h + 2, w + 2, x.shape[2]), np.int64)
    xp[1:-1, 1:-1] = x
    wt = q.conv.weight.astype(np.int64)  # (Cout, 3, 3, Cin)
    acc = np.zeros((h, w, wt.shape[0]), np.int64)
    for ky in range(3):
        for kx in range(3):
            acc += xp[ky : ky + h, kx : kx + w] @ wt[:, ky, kx].T
    acc += q.conv.bias
    assert np.abs(acc).max(initial=0) < 2**31
    return acc.astype(np.int32)


def run_int8_heads(qm: QuantModel, img: np.ndarray) -> list[np.ndarray]:
    """Runs the int8 network on ``(H, W)`` uint8 pixels; returns each head's ``(h, w, anchors * (ncls_raw + 4))`` int32
    output."""
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError("expected an (H, W) uint8 image")
    x = rnnpool(stem(img, qm.stem), qm.rnnpool)
    outs = []
    head_of = dict(qm.heads)
    for i, b in enumerate(qm.blocks):
        e = pointwise(x, b.expand) if b.expand is not None else x
        d = depthwise(e, b.dw)
        acc = pointwise_acc(d, b.project)
        y = requant(acc, b.project.mult, b.project.shift)
        if b.residual:
            y = y + requant(x, b.res_mult, b.res_shift)
        x = _sat(y, -128, 127)
        if i in head_of:
            outs.append(head(x, head_of[i]))
    return outs


def dequantize_heads(qm: QuantModel, outs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Head accumulators -> float ``cls_logits (1, A, K)`` (max-out applied) and ``box_deltas (1, A, 4)``."""
    cls_all, box_all = [], []
    for (_, hq), acc in zip(qm.heads, outs):
        v = acc.reshape(-1, acc.shape[-1]).astype(np.float64) * hq.conv.acc_scale
        k = hq.anchors * hq.ncls_raw  # a location's values: anchor-major class logits, then anchor-major deltas
        cls, box = v[:, :k].reshape(-1, hq.ncls_raw), v[:, k:].reshape(-1, 4)
        m = hq.maxout
        if m > 1:
            cls = np.concatenate((cls[:, :m].max(axis=1, keepdims=True), cls[:, m:]), axis=1)
        cls_all.append(cls)
        box_all.append(box)
    cls_t = torch.from_numpy(np.concatenate(cls_all).astype(np.float32))[None]
    box_t = torch.from_numpy(np.concatenate(box_all).astype(np.float32))[None]
    return cls_t, box_t


def run_int8(qm: QuantModel, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, W)`` uint8 -> dequantised ``cls_logits (1, A, K)``, ``box_deltas (1, A, 4)`` (the float model's format)."""
    return dequantize_heads(qm, run_int8_heads(qm, img))
