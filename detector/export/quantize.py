"""Post-training int8 quantisation of RNNPool-Face (BatchNorm folded, calibrated per-tensor activation scales).

Scheme (shared by the numpy reference :mod:`detector.export.int8_ref` and the C kernels in ``firmware/``):

* Activations: int8, symmetric, zero point 0, one scale per tensor (calibrated: the mean over the calibration images of
  each image's maximum ``|x|``; ReLU6 tensors are capped at 6). Layout HWC.
* Input: uint8 pixels ``p``; the stem reads ``v = 2p - 255`` (int16), so that ``v / 128`` is exactly the float model's
  ``(p - 127.5) / 64`` and the zero padding (``v = 0``) is exactly the float padding.
* Weights: int8, symmetric, one scale per output channel (``max|w| / 127``), BatchNorm folded in first. Biases: int32
  in the accumulator's scale (``s_in * s_w[c]``).
* Accumulators: int32. Requantisation: :func:`requant` ``(acc * m + 2^(n-1)) >> n`` with a Q31 multiplier
  ``m < 2^31`` (normalised to ``[2^30, 2^31)`` except in the RNN cells) and a total right shift ``n`` (round half
  up), then saturation.
* Residual add: ``sat8(requant(acc_project) + requant(x))`` both into the block output's scale.
* RNNPool (FastGRNN cells): per unit one int32 accumulator ``W_q x + U_q h`` (``U`` int8, ``W`` int16, both in the
  accumulator's unit, chosen so that it cannot overflow) and one requantisation into Q12 (biases
  ``round(b * 4096)``); ``sigmoid`` and ``tanh`` are 4096-entry int16 Q15 lookup tables over ``[-8, 8)`` in steps of
  1/256 (index ``clamp((pre + 8) >> 4, -2048, 2047) + 2048``); states int16 in Q12; the update
  ``h' = (g * c + 2^17) >> 18 + (z * h + 2^14) >> 15`` with ``g = ((zeta_q * (32768 - z) + 2^14) >> 15) + nu_q``
  (``zeta_q = min(round(sigmoid(zeta) * 32768), 32767)``, ``nu_q`` likewise capped at 32766, so that
  ``g * c + 2^17`` fits int32), saturated to int16. The RNNPool output is requantised to int8.
* Detection heads: int32 accumulators are the output (lossless); dequantised on the host with ``s_in * s_w[c]``; the
  max-out background is taken after dequantisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from detector.models.rnnpool_face import RNNPoolFace
from detector.nn.layers import ConvBNAct, MBConv
from detector.nn.rnnpool import FastGRNNCell

__all__ = [
    "Q_STATE",
    "LUT_SIZE",
    "BlockQ",
    "ConvQ",
    "HeadQ",
    "QuantModel",
    "RnnCellQ",
    "calibrate",
    "calibration_images",
    "fold_bn",
    "quantize_model",
    "quantize_multiplier",
    "requant",
    "sigmoid_lut",
    "tanh_lut",
]

Q_STATE = 12  # RNN pre-activations and states: Q12
LUT_SIZE = 4096  # sigmoid/tanh tables over [-8, 8), step 1/256
_LUT_STEP_SHIFT = 4  # Q12 -> table step (1/256)


def quantize_multiplier(scale: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers ``M > 0`` -> ``(m, n)`` with ``M ~= m * 2^-n``, ``m`` in ``[2^30, 2^31)``, ``1 <= n <= 62``.

    Args:
        scale: ``(C,)`` or scalar positive reals.

    Returns:
        ``(m, n)`` int64 arrays of the same shape.
    """
    s = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    if np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("requantisation multipliers must be finite and > 0")
    frac, exp = np.frexp(s)  # s = frac * 2^exp, frac in [0.5, 1)
    m = np.round(frac * (1 << 31)).astype(np.int64)
    carry = m == (1 << 31)
    m[carry] //= 2
    exp = exp + carry
    n = (31 - exp).astype(np.int64)
    if np.any(n < 1) or np.any(n > 62):
        raise ValueError(f"requantisation multiplier out of range: {s.min():.3g}..{s.max():.3g}")
    return m.reshape(np.shape(scale)), n.reshape(np.shape(scale))


def requant(acc: np.ndarray, m: np.ndarray | int, n: np.ndarray | int) -> np.ndarray:
    """Integer-only ``round(acc * m / 2^n)`` (round half up), int64 in and out; ``m``, ``n`` broadcast (channels
    last)."""
    acc = np.asarray(acc, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    return (acc * np.asarray(m, dtype=np.int64) + np.left_shift(np.int64(1), n - 1)) >> n


def sigmoid_lut() -> np.ndarray:
    """``(4096,)`` int16: ``sigmoid`` in Q15 (saturated at 32767) at ``(i - 2048) / 256``."""
    v = (np.arange(LUT_SIZE) - LUT_SIZE // 2) / 256.0
    return np.minimum(np.round(32768 / (1 + np.exp(-v))), 32767).astype(np.int16)


def tanh_lut() -> np.ndarray:
    """``(4096,)`` int16: ``tanh`` in Q15 (saturated at +-32767) at ``(i - 2048) / 256``."""
    v = (np.arange(LUT_SIZE) - LUT_SIZE // 2) / 256.0
    return np.clip(np.round(32768 * np.tanh(v)), -32767, 32767).astype(np.int16)


@dataclass
class ConvQ:
    """A quantised convolution (stem 3x3, pointwise, depthwise 3x3 or head 3x3).

    Attributes:
        kind: ``"stem"``, ``"pw"``, ``"dw"`` or ``"head"``.
        weight: int8; stem ``(Cout, 3, 3)``, pw ``(Cout, Cin)``, dw ``(C, 3, 3)``, head ``(Cout, 3, 3, Cin)``.
        bias: ``(Cout,)`` int32 in the accumulator's scale.
        mult, shift: ``(Cout,)`` requantisation to the output scale (unused by heads).
        lo, hi: output saturation bounds.
        stride: spatial stride (stem, dw).
        acc_scale: ``(Cout,)`` real value of one accumulator unit (``s_in * s_w``).
        out_scale: output activation scale (heads: 0).
    """

    kind: str
    weight: np.ndarray
    bias: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    lo: int
    hi: int
    stride: int
    acc_scale: np.ndarray
    out_scale: float


@dataclass
class RnnCellQ:
    """A quantised FastGRNN cell.

    Per unit ``k`` one int32 accumulator ``W_q x + U_q h`` in a unit ``a_k`` (see :func:`_cell_q`): ``U`` int8 values,
    ``W`` int16 values; ``pre = requant(acc, u_mult[k], u_shift[k])`` is Q12. All units share one shift (the C
    kernel keeps it in a register); the multipliers carry the per-unit scale.
    """

    W: np.ndarray  # (H, I) int16
    U: np.ndarray  # (H, H) int8
    u_mult: np.ndarray
    u_shift: np.ndarray
    bias_gate: np.ndarray  # (H,) int32 Q12
    bias_update: np.ndarray  # (H,) int32 Q12
    zeta: int  # Q15
    nu: int  # Q15


@dataclass
class RnnPoolQ:
    """Quantised RNNPool: two cells and the Q12 -> int8 output requantisation."""

    rnn1: RnnCellQ
    rnn2: RnnCellQ
    patch: int
    stride: int
    out_mult: int
    out_shift: int
    out_scale: float


@dataclass
class BlockQ:
    """Quantised MBConv: optional expand (pw), dw, project (pw); residual adds ``requant(x, res_mult, res_shift)``."""

    expand: ConvQ | None
    dw: ConvQ
    project: ConvQ
    residual: bool
    res_mult: int
    res_shift: int
    in_scale: float
    out_scale: float


@dataclass
class HeadQ:
    """Quantised detection head: one 3x3 conv whose outputs are ``[cls (anchors * ncls_raw), box (anchors * 4)]``
    int32 accumulators, each part anchor-major (see :class:`detector.nn.DetectionHead`)."""

    conv: ConvQ
    ncls_raw: int  # class logits of one anchor before max-out
    maxout: int
    num_classes: int
    anchors: int = 1  # anchors per location


@dataclass
class QuantModel:
    """Everything the int8 reference and the C generator need (integers plus dequantisation scales)."""

    name: str
    input_size: tuple[int, int]  # (width, height)
    stem: ConvQ
    rnnpool: RnnPoolQ
    blocks: list[BlockQ]
    heads: list[tuple[int, HeadQ]]  # (block index it follows, head)
    scales: dict[str, float] = field(default_factory=dict)


# --- float preparation -------------------------------------------------------------------------------------------


def fold_bn(cbn: ConvBNAct) -> tuple[np.ndarray, np.ndarray]:
    """Folds ``ConvBNAct``'s BatchNorm into its convolution: ``(weight (Cout, Cin/g, k, k), bias (Cout,))`` float64."""
    conv, bn = cbn[0], cbn[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    gamma = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    w = conv.weight.detach().double() * gamma[:, None, None, None]
    b = bn.bias.detach().double() - bn.running_mean.detach().double() * gamma
    if conv.bias is not None:
        b = b + conv.bias.detach().double() * gamma
    return w.numpy(), b.numpy()


def _weight_q(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: ``(q int8 same shape, scale (Cout,))``."""
    flat = w.reshape(w.shape[0], -1)
    scale = np.maximum(np.abs(flat).max(axis=1), 1e-12) / 127.0
    q = np.clip(np.round(flat / scale[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
    return q, scale


def _conv_q(kind: str, w: np.ndarray, b: np.ndarray, s_in: float, s_out: float, lo: int, hi: int,
            stride: int = 1) -> ConvQ:
    wq, sw = _weight_q(w)
    acc_scale = s_in * sw
    bias = np.round(b / acc_scale).astype(np.int64)
    if np.any(np.abs(bias) > 2**30):
        raise ValueError(f"{kind}: bias does not fit the accumulator")
    if kind == "stem":
        wq = wq[:, 0]  # (Cout, 3, 3)
    elif kind == "pw":
        wq = wq[:, :, 0, 0]
    elif kind == "dw":
        wq = wq[:, 0]
    elif kind == "head":
        wq = np.ascontiguousarray(wq.transpose(0, 2, 3, 1))  # (Cout, ky, kx, Cin)
    if s_out > 0:
        mult, shift = quantize_multiplier(acc_scale / s_out)
    else:
        mult = shift = np.zeros(len(sw), np.int64)
    return ConvQ(kind, wq, bias.astype(np.int32), mult, shift, lo, hi, stride, acc_scale, s_out)


def _relu6_hi(s: float) -> int:
    return int(min(127, round(6.0 / s)))


def _cell_q(cell: FastGRNNCell, s_in: float, in_max: int) -> RnnCellQ:
    """Quantises a FastGRNN cell for one shared int32 accumulator ``W_q x + U_q h`` per unit.

    The accumulator unit ``a_k`` of unit ``k`` is ``sU_k * 2^-12`` (``U`` int8 with per-row scale ``sU_k``) unless ``W``
    would then not fit int16 or the accumulator could overflow; then ``a_k`` grows (``U`` gets coarser, still int8).

    Args:
        s_in: real value of one input unit (stem int8 scale for rnn1, ``2^-12`` for rnn2's Q12 inputs).
        in_max: largest ``|input|`` (127 or 32768), used to prove the int32 accumulator cannot overflow.
    """
    W = cell.W.detach().double().numpy()
    U = cell.U.detach().double().numpy()
    one = float(1 << Q_STATE)
    _, sU = _weight_q(U)
    worst = np.abs(W).sum(1) * s_in * in_max + np.abs(U).sum(1) / one * 32768  # real |acc| * ... bound
    a = np.maximum.reduce([sU / one, np.abs(W).max(1) * s_in / 32000.0, worst / (0.9 * 2**31)])
    Wq = np.round(W * s_in / a[:, None])
    Uq = np.clip(np.round(U / one / a[:, None]), -127, 127)
    bound = np.abs(Wq).sum(1) * in_max + np.abs(Uq).sum(1) * 32768
    assert np.abs(Wq).max() <= 32767 and bound.max() < 2**31
    # pre (Q12) = acc * a * 2^12; one shift for all units (the C kernel keeps it in a register), the multipliers
    # absorb the per-unit scale (>= 20 significant bits).
    M = a * one
    _, shifts = quantize_multiplier(M)
    n = int(shifts.min())  # the largest scale keeps a normalised multiplier
    u_mult = np.round(M * 2.0**n).astype(np.int64)
    if u_mult.max() >= 2**31 or u_mult.min() < 2**20:
        raise ValueError("RNN accumulator scales differ too much across units for a common shift")
    sig = lambda t: 1.0 / (1.0 + math.exp(-float(t)))  # noqa: E731
    return RnnCellQ(
        W=Wq.astype(np.int16), U=Uq.astype(np.int8), u_mult=u_mult, u_shift=np.full(len(M), n, np.int64),
        bias_gate=np.round(cell.bias_gate.detach().double().numpy() * one).astype(np.int32),
        bias_update=np.round(cell.bias_update.detach().double().numpy() * one).astype(np.int32),
        zeta=min(int(round(sig(cell.zeta.item()) * 32768)), 32767),
        nu=min(int(round(sig(cell.nu.item()) * 32768)), 32766),
    )


# --- calibration -------------------------------------------------------------------------------------------------


def calibration_images(root: str | Path, split: str = "partB_train", count: int = 200, seed: int = 0,
                       input_size: tuple[int, int] = (320, 240)) -> list[np.ndarray]:
    """``count`` training images (seeded sample) as ``(H, W)`` uint8 grayscale at ``input_size`` (width, height)."""
    import cv2

    from detector.datasets.voc import load_voc

    records, _ = load_voc(root, split, verify_images=False)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(records), size=min(count, len(records)), replace=False)
    out = []
    for i in sorted(pick.tolist()):
        img = cv2.imread(str(records[i].path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            continue
        interp = cv2.INTER_AREA if input_size[0] < img.shape[1] else cv2.INTER_LINEAR
        out.append(cv2.resize(img, input_size, interpolation=interp))
    return out


def _tensor_names(model: RNNPoolFace) -> dict[str, nn.Module]:
    names: dict[str, nn.Module] = {"stem": model.stem, "rnnpool": model.rnnpool}
    for i, blk in enumerate(model.blocks):
        layers = list(blk.block)
        if len(layers) == 3:
            names[f"b{i}.expand"] = layers[0]
        names[f"b{i}.dw"] = layers[-2]
        names[f"b{i}.out"] = blk
    return names


@torch.no_grad()
def calibrate(model: RNNPoolFace, images: Iterable[np.ndarray]) -> dict[str, float]:
    """Per-tensor activation scales: mean over ``images`` (``(H, W)`` uint8) of each image's max ``|x|``, / 127."""
    model = model.eval()
    names = _tensor_names(model)
    maxima: dict[str, list[float]] = {k: [] for k in names}
    hooks = []
    for key, mod in names.items():
        hooks.append(mod.register_forward_hook(
            lambda _m, _i, out, key=key: maxima[key].append(float(out.detach().abs().max()))))
    try:
        for img in images:
            model(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None])
    finally:
        for h in hooks:
            h.remove()
    if not maxima["stem"]:
        raise ValueError("no calibration images")
    scales = {}
    for key, vals in maxima.items():
        v = max(float(np.mean(vals)), 1e-6)
        if key.endswith(".expand") or key.endswith(".dw"):
            v = min(v, 6.0)
        scales[key] = v / 127.0
    return scales


# --- the quantised model -----------------------------------------------------------------------------------------


def quantize_model(model: RNNPoolFace, scales: dict[str, float]) -> QuantModel:
    """Builds the integer model from a float model and calibrated activation scales (see :func:`calibrate`).

    Raises:
        ValueError: for configurations the int8 path does not support (colour input, several stem convs, RNNPool patch
            other than 8/stride 4 square, kernels other than 3x3).
    """
    cfg = model.config
    if cfg.in_channels != 1 or len(cfg.stem) != 1 or cfg.stem[0][1] != 2:
        raise ValueError("int8 export supports one grayscale stride-2 stem convolution (rnnpool_face_m4)")
    rp = model.rnnpool
    if rp.patch_size != (8, 8) or rp.stride != (4, 4):
        raise ValueError("int8 export supports RNNPool patch 8, stride 4")
    mean, std = cfg.pixel_mean[0], cfg.pixel_std[0]
    if mean != 127.5 or std != 64.0:
        raise ValueError("int8 stem assumes pixel_mean 127.5 and pixel_std 64")

    stem_cbn = model.stem[0]
    w, b = fold_bn(stem_cbn)
    s_stem = scales["stem"]
    stem = _conv_q("stem", w, b, 1.0 / 128.0, s_stem, 0, 127, stride=2)

    s_rp = scales["rnnpool"]
    om, on = quantize_multiplier(1.0 / ((1 << Q_STATE) * s_rp))
    rnnpool = RnnPoolQ(_cell_q(rp.rnn1, s_stem, 127), _cell_q(rp.rnn2, 1.0 / (1 << Q_STATE), 32768), 8, 4,
                       int(om), int(on), s_rp)

    blocks: list[BlockQ] = []
    heads: list[tuple[int, HeadQ]] = []
    s_x = s_rp
    for i, blk in enumerate(model.blocks):
        assert isinstance(blk, MBConv)
        layers = list(blk.block)
        expand = None
        s_cur = s_x
        if len(layers) == 3:
            s_e = scales[f"b{i}.expand"]
            we, be = fold_bn(layers[0])
            expand = _conv_q("pw", we, be, s_cur, s_e, 0, _relu6_hi(s_e))
            s_cur = s_e
        s_d = scales[f"b{i}.dw"]
        wd, bd = fold_bn(layers[-2])
        if wd.shape[-1] != 3:
            raise ValueError("int8 export supports 3x3 depthwise convolutions")
        dw = _conv_q("dw", wd, bd, s_cur, s_d, 0, _relu6_hi(s_d), stride=blk.stride)
        s_y = scales[f"b{i}.out"]
        wp, bp = fold_bn(layers[-1])
        project = _conv_q("pw", wp, bp, s_d, s_y, -128, 127)
        rm, rn = quantize_multiplier(s_x / s_y)
        blocks.append(BlockQ(expand, dw, project, blk.use_residual, int(rm), int(rn), s_x, s_y))
        s_x = s_y
        if str(i) in model.heads:
            head = model.heads[str(i)]
            wc = torch.cat((head.cls.weight, head.box.weight)).detach().double().numpy()
            bc = torch.cat((head.cls.bias, head.box.bias)).detach().double().numpy()
            conv = _conv_q("head", wc, bc, s_x, 0.0, 0, 0)
            a = head.anchors_per_cell
            heads.append((i, HeadQ(conv, head.cls.out_channels // a, head.maxout_background, head.num_classes, a)))
    return QuantModel(cfg.name, cfg.input_size, stem, rnnpool, blocks, heads, dict(scales))


def quantize_from_checkpoint(weights: str | Path, data_root: str | Path | None, count: int = 200,
                             images: Sequence[np.ndarray] | None = None) -> tuple[RNNPoolFace, QuantModel]:
    """Loads weights, calibrates on ``count`` ``partB_train`` images of ``data_root/scut_head`` (or ``images``)."""
    from detector.checkpoint import load_model

    model, _ = load_model(weights)
    model = model.cpu().eval()
    if images is None:
        if data_root is None:
            raise ValueError("calibration needs images or a data root")
        images = calibration_images(Path(data_root) / "scut_head", count=count, input_size=model.config.input_size)
    return model, quantize_model(model, calibrate(model, images))
