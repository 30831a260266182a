"""C generator for the int8 RNNPool-Face (``detect export m4``) and an int8-backed :class:`Detector`.

``detect export m4 --weights W --out DIR`` calibrates and quantises the model (:mod:`detector.export.quantize`),
writes ``DIR`` with the weights as ``const`` arrays (``weights.c``), the network as straight-line kernel calls
(``network.c``, ``model.h``: one statically planned arena, ``RP_ARENA_BYTES``), the kernels, drivers, startup
file, linker script and ``Makefile`` from ``firmware/``, and a memory report (``report.md``/``report.json``).
When gcc / arm-none-eabi-gcc / qemu-system-arm are present it also builds both targets, checks them bit-exact against
the numpy int8 reference on one image and adds the measured stack peak and instructions per frame to the report.

Memory schedule (320x240 input): the arena is the 76,800-byte input frame followed by a scratch area that the
stages share. Stem + RNNPool run patch row by patch row: the stem output lives only in an 8-row ring (plus the
shared row summaries and one patch row of column summaries), and each 40x64 RNNPool output row overwrites the 8 input
rows it consumed. Each MBConv block expands its input row by row into a 3-row ring, then per output pixel computes
the depthwise outputs and their projection, writing each output row in place over input rows already consumed.
Heads widen their input into a 3-row ring and stream their int32 outputs to a callback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.export.int8_ref import run_int8, run_int8_heads
from detector.export.quantize import ConvQ, QuantModel, RnnCellQ, quantize_from_checkpoint, sigmoid_lut, tanh_lut
from detector.fileio import atomic_open
from detector.inference import Detector
from detector.models.rnnpool_face import RNNPoolFace

__all__ = ["FIRMWARE_DIR", "Int8Detector", "MemoryPlan", "generate", "main", "memory_plan", "parse_output"]

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware"
FIRMWARE_FILES = ("rnnpool_int8.h", "kernels.c", "main_host.c", "main_m4.c", "startup_m4.c", "m4.ld", "Makefile",
                  "README.md")
PAPER_SECONDS_PER_FRAME = 10.45
M4_HZ = 168e6


class Int8Detector(Detector):
    """:class:`Detector` whose network is the integer-only int8 reference (outputs dequantised to float).

    The reference accepts any input size (area resize works); the C program is built for ``input_size``.

    Args:
        qmodel: the quantised model.
        model: the float model it came from (for geometry: anchors).
        **kwargs: :class:`Detector` options (``score_threshold``, ``nms_iou``, ``resize``...).
    """

    def __init__(self, qmodel: QuantModel, model: RNNPoolFace, **kwargs: Any) -> None:
        super().__init__(model=model, **kwargs)
        self.qmodel = qmodel

    @classmethod
    def from_weights(cls, weights: str | Path, data_root: str | Path | None = None, calib_images: int = 200,
                     **kwargs: Any) -> Int8Detector:
        """Loads ``weights`` and calibrates on ``calib_images`` partB_train images of ``data_root/scut_head``
        (default ``$RNNPOOL_DATA`` or ``<repo>/../shared/datasets``)."""
        model, qm = quantize_from_checkpoint(weights, Path(data_root) if data_root else _default_data_root(),
                                             count=calib_images)
        det = cls(qm, model, **kwargs)
        det.weights_path = Path(weights)
        return det

    def run_network(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(1, h, w)`` float 0..255 -> dequantised ``(1, A, K)`` logits and ``(1, A, 4)`` deltas."""
        img = np.clip(np.round(x[0]), 0, 255).astype(np.uint8)
        return run_int8(self.qmodel, img)


# --- memory plan -------------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Static memory plan of the generated C network (bytes).

    Attributes:
        frame: input frame = RNNPool output = block activations (in place).
        scratch: the largest stage scratch (stem ring + RNN summaries, or an MBConv expansion ring + depthwise row).
        stage_scratch: scratch of each stage, by name.
        flash_weights: bytes of constant weight/bias/requantisation arrays and lookup tables.
        macs: multiply-accumulates per frame of the C schedule, by stage.
    """

    frame: int
    scratch: int
    stage_scratch: dict[str, int]
    flash_weights: int
    macs: dict[str, int]
    stages: list[str] = field(default_factory=list)  # network.c's calls in order (RP_MARK indices)

    @property
    def arena(self) -> int:
        return self.frame + self.scratch


def _align4(v: int) -> int:
    return (v + 3) & ~3


def _geometry(qm: QuantModel) -> list[tuple[int, int, int]]:
    """``(h, w, c)`` of the RNNPool output and of each block output."""
    w, h = qm.input_size
    hs, ws = -(-h // 2), -(-w // 2)
    oh, ow = -(-hs // 4), -(-ws // 4)
    dims = [(oh, ow, 4 * qm.rnnpool.rnn2.U.shape[0])]
    for b in qm.blocks:
        s = b.dw.stride
        hh, ww, _ = dims[-1]
        dims.append((-(-hh // s), -(-ww // s), b.project.weight.shape[0]))
    return dims


def memory_plan(qm: QuantModel) -> MemoryPlan:
    """Arena layout and cost of the C schedule; raises ``ValueError`` if the in-place schedule is not valid."""
    w, h = qm.input_size
    if w % 16 or h % 16:
        raise ValueError("the C export needs an input size that is a multiple of 16")
    frame = w * h
    c_stem = qm.stem.weight.shape[0]
    h1 = qm.rnnpool.rnn1.U.shape[0]
    h2 = qm.rnnpool.rnn2.U.shape[0]
    hs, ws = h // 2, w // 2
    if h1 != 16 or h2 != 16 or qm.rnnpool.rnn1.W.shape[1] != 4:
        raise ValueError("the C kernels are compiled for RNNPool hidden sizes 16 (RP_HIDDEN) and 4 input channels")
    for cq in _convs(qm)[1:]:
        if max(cq.weight.shape[0], cq.weight.shape[-1] if cq.kind != "dw" else 0) > 128:
            raise ValueError("the C kernels support at most 128 channels (RP_MAXC)")
    _check_requant_ranges(qm)
    dims = _geometry(qm)
    oh, ow, crp = dims[0]
    wp = (ow - 1) * 4 + 8
    hp = (oh - 1) * 4 + 8
    if oh * ow * crp > frame:
        raise ValueError("RNNPool output larger than the frame")
    stage = {"stem+rnnpool": _align4(8 * wp * c_stem) + 8 * ow * h1 * 2 + wp * h1 * 2}
    macs = {"stem": hs * ws * c_stem * 9,
            "rnnpool rnn1": (hp * ow + oh * wp) * 8 * (h1 * c_stem + h1 * h1),
            "rnnpool rnn2": oh * ow * (16 * h1 * h2 + 4 * 8 * h2 * h2)}
    hh, ww, cin = dims[0]
    for i, b in enumerate(qm.blocks):
        s, ch = b.dw.stride, b.dw.weight.shape[0]
        ho, wo, cout = dims[i + 1]
        stage[f"block{i}"] = _align4(3 * (ww + 2) * ch)
        if b.residual:
            if s != 1 or cin != cout:
                raise ValueError("residual blocks must keep the shape")
        else:
            for y in range(ho):
                first_unexpanded = s * y + 2
                if first_unexpanded < hh and (y + 1) * wo * cout > first_unexpanded * ww * cin:
                    raise ValueError(f"block{i}: in-place output would overwrite unread input")
        macs[f"block{i}"] = ((hh * ww * cin * ch) if b.expand is not None else 0) + ho * wo * ch * (9 + cout)
        hh, ww, cin = ho, wo, cout
    dims_by_block = {i: dims[i + 1] for i in range(len(qm.blocks))}
    for k, (i, hq) in enumerate(qm.heads):
        hb, wb, cb = dims_by_block[i]
        stage[f"head{k}"] = 3 * (wb + 2) * (cb // 4) * 8
        macs[f"head{k}"] = hb * wb * 9 * cb * hq.conv.weight.shape[0]
    flash = 2 * 4096 * 2
    for cq in _convs(qm):
        flash += cq.weight.size * 2 + 4 * cq.bias.size + (16 * cq.mult.size if cq.kind != "head" else 0)
    for cell in (qm.rnnpool.rnn1, qm.rnnpool.rnn2):
        flash += 4 * (cell.W.size + cell.U.size) + 20 * cell.U.shape[0] + 4 * 4096
    head_of = {i: k for k, (i, _) in enumerate(qm.heads)}
    stages = ["stem+rnnpool"]
    for i in range(len(qm.blocks)):
        stages.append(f"block{i}")
        if i in head_of:
            stages.append(f"head{head_of[i]}")
    return MemoryPlan(frame, max(stage.values()), stage, flash, macs, stages)


def _check_requant_ranges(qm: QuantModel) -> None:
    """The C ``rq`` scales accumulators by ``2^(33 - n)`` when ``n < 33``: that must fit int32 for every layer."""

    def check(name: str, bound: np.ndarray, shift: np.ndarray) -> None:
        scaled = np.asarray(bound, np.float64) * 2.0 ** np.maximum(0, 33 - np.asarray(shift))
        if np.any(scaled >= 2**31):
            raise ValueError(f"{name}: accumulator range too large for the C requantisation")

    for k, cq in enumerate(_convs(qm)):
        if cq.kind == "head":
            continue
        w = np.abs(cq.weight.astype(np.int64)).reshape(cq.weight.shape[0], -1).sum(1)
        check(f"conv{k}", w * 255 * 2 + np.abs(cq.bias.astype(np.int64)), cq.shift)
    check("rnnpool out", np.array([32768]), np.array([qm.rnnpool.out_shift]))
    for i, b in enumerate(qm.blocks):
        check(f"block{i} residual", np.array([128]), np.array([b.res_shift]))


def _convs(qm: QuantModel) -> list[ConvQ]:
    out = [qm.stem]
    for b in qm.blocks:
        out += [c for c in (b.expand, b.dw, b.project) if c is not None]
    return out + [hq.conv for _, hq in qm.heads]


# --- C text ------------------------------------------------------------------------------------------------------


def _c_array(ctype: str, name: str, values: np.ndarray, per_line: int = 24) -> str:
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    lines = []
    for i in range(0, len(flat), per_line):
        lines.append("    " + ", ".join(str(int(v)) for v in flat[i : i + per_line]) + ",")
    return f"static const {ctype} {name}[{len(flat)}] = {{\n" + "\n".join(lines) + "\n};\n"


def sxtb16_order(n: int) -> np.ndarray:
    """Channel order of the widened (int16) vectors the C kernels feed SMLAD with: ``(0, 2, 1, 3)`` per 4."""
    if n % 4:
        raise ValueError(f"channel count {n} is not a multiple of 4")
    return (np.arange(0, n, 4)[:, None] + np.array([0, 2, 1, 3])).ravel()


def pack_pairs(w: np.ndarray) -> np.ndarray:
    """``(cout, cin)`` int8 weights -> the uint32 words ``mac_groups()`` reads: input channels in SXTB16 pair order,
    two int16 per word, output channels in groups of 4 (then 2), each group stored ``[cin/2][group]``."""
    cout, cin = w.shape
    if cout % 2:
        raise ValueError("output channel count must be even")
    v = w[:, sxtb16_order(cin)].astype(np.int64) & 0xFFFF
    words = v[:, 0::2] | (v[:, 1::2] << 16)  # (cout, cin/2)
    out, co = [], 0
    while co < cout:
        g = 4 if co + 4 <= cout else 2
        out.append(words[co : co + g].T.ravel())
        co += g
    return np.concatenate(out).astype(np.uint32)


def to_doublewords(words: np.ndarray) -> np.ndarray:
    """Consecutive uint32 words -> uint64 doublewords ``w[2i] | w[2i+1] << 32`` (what one LDRD loads)."""
    w = np.asarray(words, np.uint64).reshape(-1)
    if w.size % 2:
        raise ValueError("odd number of words")
    return w[0::2] | (w[1::2] << np.uint64(32))


def _c_array64(name: str, values: np.ndarray) -> str:
    flat = np.asarray(values, np.uint64).reshape(-1)
    lines = ["    " + ", ".join(f"0x{int(v):016x}u" for v in flat[i : i + 8]) + "," for i in range(0, len(flat), 8)]
    return f"static const uint64_t {name}[{len(flat)}] = {{\n" + "\n".join(lines) + "\n};\n"


def _conv_arrays(prefix: str, cq: ConvQ, requant: bool = True) -> str:
    if cq.kind == "pw":
        text = _c_array64(f"{prefix}_w", to_doublewords(pack_pairs(cq.weight)))
    elif cq.kind == "head":  # (cout, 3, 3, cin): one packed (cout, 3 * cin) matrix per kernel row
        cout = cq.weight.shape[0]
        rows = [pack_pairs(cq.weight[:, ky].reshape(cout, -1)) for ky in range(3)]
        text = _c_array64(f"{prefix}_w", to_doublewords(np.concatenate(rows)))
    elif cq.kind == "stem":  # (cout, 3, 3) -> (cout, 5) pair words over the taps in row-major order
        v = np.concatenate((cq.weight.reshape(-1, 9), np.zeros((cq.weight.shape[0], 1), np.int8)), axis=1)
        text = _c_array("uint32_t", f"{prefix}_w", _natural_pairs(v))
    elif cq.kind == "dw":  # (c, 3, 3) -> [c/4][tap][(c0, c2), (c1, c3)] int16 pair words
        c = cq.weight.shape[0]
        if c % 4:
            raise ValueError("depthwise channel count must be a multiple of 4")
        v = cq.weight.reshape(c // 4, 4, 9).transpose(0, 2, 1).astype(np.int64) & 0xFFFF  # (c/4, 9, 4)
        words = np.stack((v[..., 0] | (v[..., 2] << 16), v[..., 1] | (v[..., 3] << 16)), axis=-1)
        text = _c_array64(f"{prefix}_w", to_doublewords(words))
    else:
        text = _c_array("int8_t", f"{prefix}_w", cq.weight)
    text += _c_array("int32_t", f"{prefix}_b", cq.bias)
    if requant:
        text += _c_array64(f"{prefix}_rq", requant_doublewords(cq.mult, cq.shift))
    return text


def requant_doublewords(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Per channel ``(m | rnd << 32), (sh | 0)`` with ``rnd = 2^(n-33)``, ``sh = n - 32`` (``rqc()`` in C)."""
    n = np.asarray(n, np.int64)
    if np.any(n < 33):
        raise ValueError("a convolution's requantisation multiplier is >= 0.25; the C kernels need n >= 33")
    words = np.stack((np.asarray(m, np.int64), np.left_shift(1, n - 33), n - 32, np.zeros_like(n)), axis=1)
    return to_doublewords(words & 0xFFFFFFFF)


def _pw_init(prefix: str, cq: ConvQ, lo: int) -> str:
    cout, cin = cq.weight.shape
    if (cq.lo, cq.hi) != (lo, 127):
        raise ValueError(f"{prefix}: the C kernels saturate to [{lo}, 127], the layer needs [{cq.lo}, {cq.hi}]")
    return f"{{{prefix}_w, {prefix}_b, {prefix}_rq, {cin}, {cout}}}"


def zg_lut(c: RnnCellQ) -> np.ndarray:
    """``(4096,)`` uint32: ``sigmoid | g << 16`` with ``g = ((zeta * (32768 - sigmoid) + 2^14) >> 15) + nu``."""
    z = sigmoid_lut().astype(np.int64)
    g = ((c.zeta * (32768 - z) + (1 << 14)) >> 15) + c.nu
    assert z.min() >= 0 and g.min() >= 0 and g.max() <= 65533
    return (z | (g << 16)).astype(np.uint32)


def _natural_pairs(m: np.ndarray) -> np.ndarray:
    """``(rows, 2k)`` int16 values -> ``(rows, k)`` uint32 words ``(v[2i], v[2i+1])`` (low half first)."""
    v = m.astype(np.int64) & 0xFFFF
    return (v[:, 0::2] | (v[:, 1::2] << 16)).astype(np.uint32)


def _cell(prefix: str, c: RnnCellQ) -> tuple[str, str]:
    """A cell's C arrays (``cell_t`` in ``rnnpool_int8.h``): W and U words, per-unit constants, sigmoid|g table."""
    hid, inp = c.W.shape
    if np.any(c.u_shift < 33):
        raise ValueError("RNN U scale too large for the C kernel (needs max|U| < 0.25)")
    off = 8 + 32768  # LUT index rounding and offset folded into the biases
    if len(set(c.u_shift.tolist())) != 1:
        raise ValueError("the C RNN kernel needs one requantisation shift per cell")
    n = int(c.u_shift[0])
    consts = np.stack([c.u_mult, c.bias_gate.astype(np.int64) + off, c.bias_update.astype(np.int64) + off,
                       np.zeros(hid, np.int64)], axis=1)
    if inp % 4:
        raise ValueError("RNN input size must be a multiple of 4")
    arrays = (_c_array("uint32_t", f"{prefix}_W", _natural_pairs(c.W))
              + _c_array64(f"{prefix}_W64", to_doublewords(_natural_pairs(c.W)))
              + _c_array64(f"{prefix}_U", to_doublewords(_natural_pairs(c.U)))
              + _c_array64(f"{prefix}_k", to_doublewords(consts.astype(np.int64) & 0xFFFFFFFF))
              + _c_array("uint32_t", f"{prefix}_zg", zg_lut(c)))
    init = f"{{{prefix}_W, {prefix}_W64, {prefix}_U, {prefix}_k, {prefix}_zg, {1 << (n - 33)}, {n - 32}, {inp}, {hid}}}"
    return arrays, init


def weights_c(qm: QuantModel) -> str:
    """``weights.c``: every constant (flash) and the layer descriptors ``rp_stem``, ``rp_rnnpool``, ``rp_block<i>``,
    ``rp_head<k>``."""
    parts = ["/* Generated by `detect export m4`: int8 weights (flash) and layer descriptors. */\n",
             '#include "model.h"\n\n',
             _c_array("int16_t", "sig_lut", sigmoid_lut()).replace("static const int16_t sig_lut",
                                                                   "const int16_t rp_sigmoid_lut"),
             _c_array("int16_t", "tanh_lut", tanh_lut()).replace("static const int16_t tanh_lut",
                                                                 "const int16_t rp_tanh_lut")]
    s = qm.stem
    parts.append(_conv_arrays("stem", s))
    parts.append(f"const stem_t rp_stem = {{stem_w, stem_b, stem_rq, {s.weight.shape[0]}}};\n\n")
    a1, i1 = _cell("rnn1", qm.rnnpool.rnn1)
    a2, i2 = _cell("rnn2", qm.rnnpool.rnn2)
    rp = qm.rnnpool
    parts += [a1, a2, f"const rnnpool_t rp_rnnpool = {{{i1}, {i2}, {rp.out_mult}, {rp.out_shift}}};\n\n"]
    for i, b in enumerate(qm.blocks):
        p = f"b{i}"
        exp_ref = "NULL"
        if b.expand is not None:
            parts.append(_conv_arrays(f"{p}e", b.expand))
            parts.append(f"static const pw_t {p}_expand = {_pw_init(f'{p}e', b.expand, 0)};\n")
            exp_ref = f"&{p}_expand"
        parts.append(_conv_arrays(f"{p}d", b.dw))
        parts.append(_conv_arrays(f"{p}p", b.project))
        d = b.dw
        if (d.lo, d.hi) != (0, 127):
            raise ValueError("the C depthwise kernel saturates to [0, 127]")
        dw_init = f"{{{p}d_w, {p}d_b, {p}d_rq, {d.weight.shape[0]}, {d.stride}}}"
        parts.append(f"const mbconv_t rp_block{i} = {{{exp_ref}, {dw_init}, {_pw_init(f'{p}p', b.project, -128)}, "
                     f"{int(b.residual)}, {b.res_mult}, {b.res_shift}}};\n\n")
    for k, (_, hq) in enumerate(qm.heads):
        parts.append(_conv_arrays(f"h{k}", hq.conv, requant=False))
        cout, _, _, cin = hq.conv.weight.shape
        parts.append(f"const head_t rp_head{k} = {{h{k}_w, h{k}_b, {cin}, {cout}}};\n\n")
    return "".join(parts)


def model_h(qm: QuantModel, plan: MemoryPlan) -> str:
    w, h = qm.input_size
    dims = _geometry(qm)
    lines = [
        "/* Generated by `detect export m4`: geometry, the statically planned arena and the network entry. */",
        "#ifndef RP_MODEL_H", "#define RP_MODEL_H", "", "#include <stddef.h>", '#include "rnnpool_int8.h"', "",
        f"#define RP_IN_W {w}", f"#define RP_IN_H {h}",
        f"#define RP_FRAME_BYTES {plan.frame}   /* input frame; RNNPool output and block maps reuse it in place */",
        f"#define RP_SCRATCH_BYTES {plan.scratch}   /* shared by the streamed stages */",
        "#define RP_ARENA_BYTES (RP_FRAME_BYTES + RP_SCRATCH_BYTES)",
        f"#define RP_NUM_HEADS {len(qm.heads)}",
        f"#define RP_NUM_LOCATIONS {sum(dims[i + 1][0] * dims[i + 1][1] for i, _ in qm.heads)}",
        "", "extern const stem_t rp_stem;", "extern const rnnpool_t rp_rnnpool;",
    ]
    lines += [f"extern const mbconv_t rp_block{i};" for i in range(len(qm.blocks))]
    lines += [f"extern const head_t rp_head{k};" for k in range(len(qm.heads))]
    lines += ["", "/* the input frame (RP_IN_W x RP_IN_H uint8) lives at the start of the arena */",
              "uint8_t *network_input(void);",
              "/* runs the network on network_input() (destroying it); head outputs go to emit() */",
              "void network_run(emit_fn emit, void *ctx);",
              "/* 0 when every stage's scratch fits RP_SCRATCH_BYTES */", "int network_check(void);", "",
              "#endif", ""]
    return "\n".join(lines)


def network_c(qm: QuantModel, plan: MemoryPlan) -> str:
    w, h = qm.input_size
    dims = _geometry(qm)
    head_of = {i: k for k, (i, _) in enumerate(qm.heads)}
    oh, ow, c = dims[0]
    calls = [f"    rnnpool_stem_run(frame, {h}, {w}, &rp_stem, &rp_rnnpool, scratch); /* -> {oh}x{ow}x{c} in place */",
             "    RP_MARK(0);"]
    checks = [f"    if (rnnpool_stem_scratch_bytes({h}, {w}, &rp_stem, &rp_rnnpool) > RP_SCRATCH_BYTES) return 1;"]
    hh, ww = oh, ow
    for i in range(len(qm.blocks)):
        ho, wo, co = dims[i + 1]
        calls.append(f"    mbconv_run(act, {hh}, {ww}, &rp_block{i}, scratch); /* -> {ho}x{wo}x{co} in place */")
        calls.append(f"    RP_MARK({len(calls) // 2});")
        checks.append(f"    if (mbconv_scratch_bytes({hh}, {ww}, &rp_block{i}) > RP_SCRATCH_BYTES) return 1;")
        if i in head_of:
            k = head_of[i]
            calls.append(f"    head_run(act, {ho}, {wo}, &rp_head{k}, {k}, emit, ctx, scratch);")
            checks.append(f"    if (head_scratch_bytes({ho}, {wo}, &rp_head{k}) > RP_SCRATCH_BYTES) return 1;")
            calls.append(f"    RP_MARK({len(calls) // 2});")
        hh, ww = ho, wo
    return "\n".join([
        "/* Generated by `detect export m4`: the network as straight-line kernel calls over one arena. */",
        "#include <string.h>", "", '#include "model.h"', "",
        "#ifdef RP_PROFILE /* the M4 driver records SysTick after each stage */",
        "void rp_mark(int stage);", "#define RP_MARK(i) rp_mark(i)", "#else", "#define RP_MARK(i) ((void)0)", "#endif",
        "",
        "#ifndef RP_GUARD_BYTES /* test builds (make guard) surround the arena with guard bytes */",
        "#define RP_GUARD_BYTES 0", "#endif", "#define RP_GUARD_WORDS ((RP_GUARD_BYTES + 7) / 8)",
        "/* the only activation memory (8-byte aligned), between the optional guards */",
        "static uint64_t arena_mem[2 * RP_GUARD_WORDS + (RP_ARENA_BYTES + 7) / 8];",
        "#define arena (arena_mem + RP_GUARD_WORDS)", "",
        "uint8_t *network_input(void)", "{", "    return (uint8_t *)arena;", "}", "",
        "#if RP_GUARD_BYTES > 0",
        "#define RP_GUARD_FILL 0xA5u",
        "/* Guard regions: the words before the arena, and every byte after its RP_ARENA_BYTES. */",
        "static uint8_t *guard_hi(void) { return (uint8_t *)arena + RP_ARENA_BYTES; }",
        "static unsigned guard_hi_len(void) { return (unsigned)(sizeof arena_mem - 8u * RP_GUARD_WORDS - RP_ARENA_BYTES); }",
        "", "void network_guard_fill(void)", "{",
        "    memset(arena_mem, RP_GUARD_FILL, 8u * RP_GUARD_WORDS);",
        "    memset(guard_hi(), RP_GUARD_FILL, guard_hi_len());", "}", "",
        "/* Number of guard bytes that no longer hold the fill pattern (0: nothing was written outside the arena). */",
        "unsigned network_guard_check(void)", "{", "    unsigned bad = 0;",
        "    const uint8_t *lo = (const uint8_t *)arena_mem;",
        "    for (unsigned i = 0; i < 8u * RP_GUARD_WORDS; i++) bad += lo[i] != RP_GUARD_FILL;",
        "    for (unsigned i = 0; i < guard_hi_len(); i++) bad += guard_hi()[i] != RP_GUARD_FILL;",
        "    return bad;", "}", "#endif", "",
        "int network_check(void)", "{", *checks, "    return 0;", "}", "",
        "void network_run(emit_fn emit, void *ctx)", "{",
        "    uint8_t *frame = (uint8_t *)arena;", "    int8_t *act = (int8_t *)arena;",
        "    void *scratch = (uint8_t *)arena + RP_FRAME_BYTES;",
        *calls, "}", ""])


def _write_atomic(path: Path, text: str) -> None:
    """Exported files are replaced whole (see :mod:`detector.fileio`): an interrupted export never leaves a torn one."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def generate(qm: QuantModel, out: str | Path) -> MemoryPlan:
    """Writes the C project for ``qm`` into ``out`` (created); returns its memory plan."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = memory_plan(qm)
    for name in FIRMWARE_FILES:
        _write_atomic(out / name, (FIRMWARE_DIR / name).read_text())
    _write_atomic(out / "weights.c", weights_c(qm))
    _write_atomic(out / "model.h", model_h(qm, plan))
    _write_atomic(out / "network.c", network_c(qm, plan))
    return plan


# --- running the builds ------------------------------------------------------------------------------------------


def parse_output(text: str) -> tuple[list[np.ndarray], dict[str, int]]:
    """The C programs' output -> per head ``(locations, values)`` int64 arrays and the ``# key value`` statistics."""
    rows: dict[int, list[list[int]]] = {}
    stats: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            key, value = line[2:].split()
            stats[key] = int(value)
        elif line.strip() and line[0].isdigit():
            vals = [int(v) for v in line.split()]
            rows.setdefault(vals[0], []).append(vals[1:])
    return [np.asarray(rows[k], np.int64) for k in sorted(rows)], stats


def reference_output(qm: QuantModel, frame: np.ndarray) -> list[np.ndarray]:
    """The numpy int8 reference in the C programs' layout: per head ``(h * w, anchors * (ncls_raw + 4))``."""
    return [o.reshape(-1, o.shape[-1]).astype(np.int64) for o in run_int8_heads(qm, frame)]


def tools_available() -> dict[str, bool]:
    return {t: shutil.which(t) is not None for t in ("make", "cc", "arm-none-eabi-gcc", "qemu-system-arm")}


def run_host(out: Path, frame: np.ndarray, target: str = "host") -> str:
    """Builds ``make <target>`` (host, asan or guard) in ``out`` and runs it on ``frame``; returns its stdout.

    Raises:
        subprocess.CalledProcessError: the build failed or the program exited non-zero (a sanitizer report, or
            guard bytes around the arena overwritten: exit 3).
    """
    subprocess.run(["make", "-s", target], cwd=out, check=True, capture_output=True, text=True)
    raw = out / "frame.raw"
    raw.write_bytes(np.ascontiguousarray(frame, np.uint8).tobytes())
    exe = out / "build" / f"detect_{target}"
    return subprocess.run([str(exe), str(raw)], check=True, capture_output=True, text=True).stdout


def run_m4(out: Path, frame: np.ndarray, timeout: float = 600) -> str:
    """Builds the M4 image and runs it under QEMU on ``frame`` (``frame.raw`` in ``out``); returns its output."""
    subprocess.run(["make", "-s", "m4"], cwd=out, check=True, capture_output=True, text=True)
    (out / "frame.raw").write_bytes(np.ascontiguousarray(frame, np.uint8).tobytes())
    cmd = ["qemu-system-arm", "-M", "netduinoplus2", "-nographic", "-monitor", "none", "-serial", "null",
           "-icount", "shift=0", "-semihosting-config", "enable=on,target=native", "-kernel", "build/detect_m4.elf"]
    return subprocess.run(cmd, cwd=out, check=True, capture_output=True, text=True, timeout=timeout).stdout


def m4_sizes(out: Path) -> dict[str, int]:
    """``text``/``data``/``bss`` of the M4 ELF (arm-none-eabi-size)."""
    res = subprocess.run(["arm-none-eabi-size", "build/detect_m4.elf"], cwd=out, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    text, data, bss = (int(v) for v in res[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def report_markdown(plan: MemoryPlan, measured: dict[str, Any]) -> str:
    """The memory / flash / cost report as markdown."""
    total_macs = sum(plan.macs.values())
    lines = ["# RNNPool-Face int8 on Cortex-M4: memory and cost report", "",
             "| item | bytes |", "|---|---:|",
             f"| input frame (reused in place by RNNPool output and blocks) | {plan.frame:,} |",
             f"| shared stage scratch | {plan.scratch:,} |",
             f"| **activation arena (`RP_ARENA_BYTES`)** | **{plan.arena:,}** |"]
    for k, v in plan.stage_scratch.items():
        lines.append(f"| &nbsp; scratch of {k} | {v:,} |")
    if "stack_peak_bytes" in measured:
        peak = measured["data_bytes"] + measured["bss_bytes"] + measured["stack_peak_bytes"]
        lines += [f"| stack peak (measured, stack painting) | {measured['stack_peak_bytes']:,} |",
                  f"| .data + .bss of the M4 image (arena, driver buffers) | "
                  f"{measured['data_bytes'] + measured['bss_bytes']:,} |",
                  f"| **peak RAM = data + bss + measured stack** | **{peak:,}** ({peak / 1024:.1f} KiB) |",
                  f"| flash (text + data of the M4 image) | {measured['flash_bytes']:,} |"]
    else:
        lines.append(f"| flash: weights, tables and descriptors (estimate) | {plan.flash_weights:,} |")
    ins_of = {name: measured.get(f"stage_{k:02d}") for k, name in enumerate(plan.stages)}
    if any(v is not None for v in ins_of.values()):
        macs = dict(plan.macs)
        rows = [("stem+rnnpool", macs.pop("stem") + macs.pop("rnnpool rnn1") + macs.pop("rnnpool rnn2"))]
        rows += [(name, macs[name]) for name in plan.stages[1:]]
        lines += ["", "| stage | multiply-adds | M4 instructions | instructions / MAC |", "|---|---:|---:|---:|"]
        for name, m in rows:
            ins = ins_of.get(name) or 0
            lines.append(f"| {name} | {m:,} | {ins:,} | {ins / max(m, 1):.2f} |")
        total_ins = sum(v or 0 for v in ins_of.values())
        lines.append(f"| **total** | **{total_macs:,}** | **{total_ins:,}** | {total_ins / total_macs:.2f} |")
    else:
        lines += ["", "| stage | multiply-adds |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in plan.macs.items()]
        lines.append(f"| **total** | **{total_macs:,}** |")
    if "instructions" in measured:
        ins = measured["instructions"]
        lines += ["", f"Instructions per frame (QEMU netduinoplus2, `-icount shift=0`, SysTick): **{ins:,}** "
                      f"= {ins / M4_HZ:.3f} s at 168 MHz (1 instruction/cycle lower bound) vs the paper's "
                      f"{PAPER_SECONDS_PER_FRAME} s per frame."]
    if "bit_exact" in measured:
        lines.append(f"\nBit-exact with the numpy int8 reference: {measured['bit_exact']}.")
    return "\n".join(lines) + "\n"


def measure(qm: QuantModel, out: Path, frame: np.ndarray) -> dict[str, Any]:
    """Builds host (and M4 + QEMU when available), checks bit-exactness on ``frame``, collects the numbers."""
    tools = tools_available()
    result: dict[str, Any] = {}
    ref = reference_output(qm, frame)
    if tools["make"] and tools["cc"]:
        heads, _ = parse_output(run_host(out, frame))
        result["bit_exact_host"] = len(heads) == len(ref) and all(np.array_equal(a, b) for a, b in zip(heads, ref))
    if tools["make"] and tools["arm-none-eabi-gcc"] and tools["qemu-system-arm"]:
        heads, stats = parse_output(run_m4(out, frame))
        result["bit_exact_m4"] = len(heads) == len(ref) and all(np.array_equal(a, b) for a, b in zip(heads, ref))
        sizes = m4_sizes(out)
        result.update(stats)
        result["flash_bytes"] = sizes["text"] + sizes["data"]
    flags = [v for k, v in result.items() if k.startswith("bit_exact_")]
    if flags:
        result["bit_exact"] = ", ".join(f"{k[10:]}: {'yes' if result[k] else 'NO'}"
                                        for k in result if k.startswith("bit_exact_"))
    return result


def _default_data_root() -> Path:
    env = os.environ.get("RNNPOOL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "datasets"


def main(argv: list[str] | None = None) -> int:
    """``detect export m4 --weights W --out DIR``: calibrate, quantise, generate C, build, measure, report."""
    p = argparse.ArgumentParser(prog="detect export m4", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="weights file or training checkpoint (default: the shipped "
                                                   "weights/rnnpool_face_m4.pt)")
    p.add_argument("--out", required=True, help="output directory of the C project")
    p.add_argument("--data", default=None, help="datasets root holding scut_head (default $RNNPOOL_DATA or "
                                                "<repo>/../shared/datasets)")
    p.add_argument("--calib-images", type=int, default=200, help="partB_train images for calibration")
    p.add_argument("--no-measure", action="store_true", help="only generate (no builds, no QEMU)")
    args = p.parse_args(argv)

    from detector.checkpoint import WeightsError, default_weights_path

    weights = args.weights or default_weights_path("rnnpool_face_m4")
    data = Path(args.data) if args.data else _default_data_root()
    out = Path(args.out)
    try:
        if not (data / "scut_head").is_dir():
            print(f"error: calibration data not found: {data / 'scut_head'} (set --data or RNNPOOL_DATA)",
                  file=sys.stderr)
            return 2
        model, qm = quantize_from_checkpoint(weights, data, count=args.calib_images)
        plan = generate(qm, out)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    measured: dict[str, Any] = {}
    if not args.no_measure:
        from detector.export.quantize import calibration_images

        frame = calibration_images(data / "scut_head", "partB_val", count=1, seed=1, input_size=qm.input_size)[0]
        try:
            measured = measure(qm, out, frame)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            detail = getattr(e, "stderr", "") or ""
            print(f"error: build or run failed: {e}\n{detail[-2000:]}", file=sys.stderr)
            return 1
    _write_atomic(out / "report.md", report_markdown(plan, measured))
    _write_atomic(out / "report.json", json.dumps(
        {"arena_bytes": plan.arena, "frame_bytes": plan.frame, "scratch_bytes": plan.scratch,
         "stage_scratch": plan.stage_scratch, "flash_weights_bytes": plan.flash_weights, "macs": plan.macs,
         "scales": qm.scales, **{k: v for k, v in measured.items()}}, indent=2))
    print(report_markdown(plan, measured))
    ok = all(v for k, v in measured.items() if k.startswith("bit_exact_") and isinstance(v, bool))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
