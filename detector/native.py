"""The front of RNNPool-Face (normalisation, conv stem, RNNPool) in C, loaded with :mod:`ctypes`.

onnxruntime runs RNNPool as a couple of hundred tiny kernels; :class:`NativeFront` runs the whole front in one call
of ``detector/csrc/rnnpool_front.c`` (float32, vectorised over sequences of the RNNs, optionally multi-threaded),
so that inference can run the front in C and the rest of the network in onnxruntime (:class:`NativeDetector`, the
``native`` backend).

The library is compiled on first use by :func:`build_library` with the system C compiler into a cache folder; nothing
is compiled at import time. Without a working compiler :class:`NativeUnavailable` is raised.

Example::

    front = NativeFront(model, threads=2)   # model: an RNNPoolFace
    features = front(image)                 # (1, C, H, W) float32 pixels 0..255 -> (1, 4 * h2, H', W')
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from detector.inference import Detector
from detector.postprocess import DEFAULT_NMS_IOU

if TYPE_CHECKING:
    from detector.models.rnnpool_face import RNNPoolFace

__all__ = ["CFLAGS", "LDLIBS", "SOURCE", "NativeDetector", "NativeFront", "NativeUnavailable", "build_library",
           "library_path"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "rnnpool_front.c"
"""The C source of the front."""

CFLAGS = ("-O3", "-march=native", "-std=c99", "-fPIC", "-shared", "-pthread", "-ffp-contract=fast")
"""Compiler flags. ``-ffp-contract=fast`` lets ``a * b + c`` use FMA instructions (ISO C mode turns that off); no
``-ffast-math``: the C code does its own fast tanh and sigmoid."""

LDLIBS = ("-lm",)
"""Libraries linked after the source."""

_COMPILE_TIMEOUT_S = 120


class NativeUnavailable(RuntimeError):
    """The C front cannot be used here: no C compiler, or it failed to build the library (one-line message)."""


def _compiler() -> list[str]:
    """The C compiler command: ``$CC`` (may carry arguments, e.g. ``ccache gcc``), else ``cc``."""
    cmd = shlex.split(os.environ.get("CC", "") or "cc")
    if not cmd:
        cmd = ["cc"]
    return cmd


@functools.lru_cache(maxsize=8)
def _compiler_version(cmd: tuple[str, ...]) -> str:
    """``cmd --version`` (cached per command; failures are not cached)."""
    try:
        proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise NativeUnavailable(f"no C compiler: {cmd[0]!r} not found (set $CC)") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"C compiler {shlex.join(cmd)!r} does not run: {e}") from None
    if proc.returncode != 0:
        raise NativeUnavailable(f"C compiler {shlex.join(cmd)!r} failed to report its version "
                                f"(exit status {proc.returncode})")
    return proc.stdout.strip() or proc.stderr.strip()


@functools.lru_cache(maxsize=1)
def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (a cache shared between machines, e.g. a
    network home folder, must not hand one CPU a library built for another)."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        fields = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(fields))  # the first core's lines (cores repeat them)
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rnnpool-face"


def library_path(cache_dir: Path | None = None, source: Path | None = None) -> Path:
    """Where :func:`build_library` puts the library for ``source``: the file name carries a hash of the source, the
    flags, the compiler command and its version and the CPU (``-march=native``), so a change to any of them builds a
    new library.

    Raises:
        NativeUnavailable: no working C compiler.
    """
    src = Path(source) if source is not None else SOURCE
    cmd = _compiler()
    version = _compiler_version(tuple(cmd))
    h = hashlib.sha256()
    for part in (src.read_bytes(), "\0".join((*CFLAGS, *LDLIBS)).encode(), "\0".join(cmd).encode(), version.encode(),
                 _cpu_id().encode()):
        h.update(hashlib.sha256(part).digest())
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return folder / f"{src.stem}-{h.hexdigest()[:20]}.so"


def build_library(cache_dir: Path | None = None, source: Path | None = None) -> Path:
    """Compiles ``detector/csrc/rnnpool_front.c`` (or ``source``) into a shared library, once per source, flags and
    compiler.

    Args:
        cache_dir: folder of the compiled libraries; default ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/rnnpool-face``.
        source: the C file (tests); default :data:`SOURCE`.

    Returns:
        The library's path (see :func:`library_path`). Compiled to a temporary name and renamed, so that concurrent
        builds and interrupted ones never leave a partial library under the final name.

    Raises:
        NativeUnavailable: no C compiler, or compilation failed (the message carries the compiler's first error).
    """
    target = library_path(cache_dir, source)
    if target.is_file():
        return target
    src = Path(source) if source is not None else SOURCE
    cmd = _compiler()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so.tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise NativeUnavailable(f"cannot write the compiled library to {target.parent}: {e}") from None
    tmp = Path(tmp_name)
    try:
        try:
            proc = subprocess.run([*cmd, *CFLAGS, "-o", str(tmp), str(src), *LDLIBS], capture_output=True, text=True,
                                  timeout=_COMPILE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeUnavailable(f"compiling {src.name} with {shlex.join(cmd)!r} failed: {e}") from None
        if proc.returncode != 0 or tmp.stat().st_size == 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no output")
            raise NativeUnavailable(f"compiling {src.name} with {shlex.join(cmd)!r} failed "
                                    f"(exit status {proc.returncode}): {first}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


_F32P = ctypes.POINTER(ctypes.c_float)
_I32P = ctypes.POINTER(ctypes.c_int)

_ERRORS = {-1: "invalid arguments", -2: "out of memory"}


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path}: {e}") from None
    i, sz = ctypes.c_int, ctypes.c_size_t
    vp = ctypes.c_void_p  # float buffers passed per call, as addresses (``a.ctypes.data``: faster than pointers)
    lib.rnnpool_front.argtypes = [
        vp, i, i, i,  # image, channels, height, width
        _F32P, _F32P,  # pixel_mean, pixel_std
        i, _I32P, _I32P, _F32P, _F32P,  # n_stem, stem_out, stem_stride, stem_weight, stem_bias
        i, i, i, i, i, i,  # hidden1, hidden2, patch_rows, patch_cols, stride_rows, stride_cols
        _F32P, _F32P,  # rnn1, rnn2
        i, vp, sz, vp,  # threads, workspace, workspace_floats, out
    ]
    lib.rnnpool_front.restype = i
    lib.rnnpool_front_workspace_size.argtypes = [i, i, i, i, _I32P, _I32P, i, i, i, i, i, i, i]
    lib.rnnpool_front_workspace_size.restype = sz
    lib.rnnpool_front_activations.argtypes = [i, _F32P, _F32P, _F32P]
    lib.rnnpool_front_activations.restype = None
    return lib


def _ptr(a: np.ndarray, kind: Any = _F32P) -> Any:
    """A ctypes pointer to ``a``'s data (``a`` must stay alive while it is used)."""
    return a.ctypes.data_as(kind)


def _f32(a: object) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


class NativeFront:
    """``model.rnnpool(model.stem((x - pixel_mean) / pixel_std))`` of an :class:`RNNPoolFace` in C, for one image.

    The parameters are copied when the object is built (BatchNorm folded into the stem convolutions with its running
    statistics, i.e. eval-mode semantics): later changes to the model are not seen.

    Args:
        model: the network (any variant: 1 or 3 input channels, 0..8 stem convolutions, any RNNPool geometry).
        threads: worker threads per call (1 runs on the caller's thread); capped at the number of output rows.
        library: a compiled library (default: :func:`build_library`).

    Raises:
        NativeUnavailable: the library cannot be built or loaded.
        ValueError: a stem layer that is not a 3x3 ConvBNReLU with padding 1.

    Calls are serialised per object (one workspace); use one object per thread for parallel calls.
    """

    def __init__(self, model: RNNPoolFace, threads: int = 2, library: Path | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.in_channels = int(model.config.in_channels)
        with torch.no_grad():
            self._mean = _f32(model.pixel_mean.detach().cpu().reshape(-1))
            self._std = _f32(model.pixel_std.detach().cpu().reshape(-1))
            stem_out, stem_stride, weights, biases = [], [], [], []
            for i, layer in enumerate(model.stem):
                conv, bn, act = layer[0], layer[1], layer[2]
                if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)
                        and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.dilation == (1, 1)
                        and conv.groups == 1 and conv.stride[0] == conv.stride[1]):
                    raise ValueError(f"stem layer {i} is not a 3x3 ConvBNReLU with padding 1 and a square stride")
                w = conv.weight.detach().double().cpu()
                scale = bn.weight.detach().double().cpu() / torch.sqrt(bn.running_var.detach().double().cpu()
                                                                       + bn.eps)
                b = bn.bias.detach().double().cpu() - bn.running_mean.detach().double().cpu() * scale
                if conv.bias is not None:
                    b = b + conv.bias.detach().double().cpu() * scale
                weights.append((w * scale.view(-1, 1, 1, 1)).float().numpy().ravel())
                biases.append(b.float().numpy())
                stem_out.append(conv.out_channels)
                stem_stride.append(conv.stride[0])
            pool = model.rnnpool
            self.hidden1, self.hidden2 = int(pool.hidden_size1), int(pool.hidden_size2)
            self.patch = tuple(int(v) for v in pool.patch_size)
            self.stride = tuple(int(v) for v in pool.stride)

            def pack(cell: nn.Module) -> np.ndarray:
                parts = [cell.W, cell.U, cell.bias_gate, cell.bias_update, cell.zeta, cell.nu]
                return _f32(np.concatenate([p.detach().float().cpu().numpy().ravel() for p in parts]))

            self._rnn1, self._rnn2 = pack(pool.rnn1), pack(pool.rnn2)
        self._n_stem = len(stem_out)
        self.stem_strides = tuple(stem_stride)
        self._stem_out = np.ascontiguousarray(np.array(stem_out or [0], dtype=np.int32))
        self._stem_stride = np.ascontiguousarray(np.array(stem_stride or [1], dtype=np.int32))
        self._stem_w = _f32(np.concatenate(weights)) if weights else _f32(np.zeros(1))
        self._stem_b = _f32(np.concatenate(biases)) if biases else _f32(np.zeros(1))
        self.library_path = Path(library) if library is not None else build_library()
        self._lib = _load(self.library_path)
        # the arguments after the image's (ctypes pointers are slow to make: once here; the arrays live in self)
        self._params = (_ptr(self._mean), _ptr(self._std), self._n_stem, _ptr(self._stem_out, _I32P),
                        _ptr(self._stem_stride, _I32P), _ptr(self._stem_w), _ptr(self._stem_b), self.hidden1,
                        self.hidden2, *self.patch, *self.stride, _ptr(self._rnn1), _ptr(self._rnn2), self.threads)
        self._lock = threading.Lock()
        self._workspace: dict[tuple[int, int], np.ndarray] = {}

    @property
    def out_channels(self) -> int:
        """``4 * h2``."""
        return 4 * self.hidden2

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` of the output for an ``height x width`` input."""
        for s in self.stem_strides:
            height, width = -(-height // s), -(-width // s)
        return -(-height // self.stride[0]), -(-width // self.stride[1])

    def _workspace_for(self, height: int, width: int) -> np.ndarray:
        ws = self._workspace.get((height, width))
        if ws is None:
            n = self._lib.rnnpool_front_workspace_size(
                self.in_channels, height, width, self._n_stem, _ptr(self._stem_out, _I32P),
                _ptr(self._stem_stride, _I32P), self.hidden1, self.hidden2, *self.patch, *self.stride, self.threads)
            if n == 0:
                raise ValueError(f"unsupported input size {height}x{width}")
            if len(self._workspace) >= 4:
                self._workspace.clear()
            ws = self._workspace[(height, width)] = np.empty(n, dtype=np.float32)
        return ws

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Runs the front on one image.

        Args:
            x: ``(1, C, H, W)`` or ``(C, H, W)`` float pixels 0..255 (converted to contiguous float32 if needed),
                ``C`` the model's input channels.

        Returns:
            ``(1, 4 * h2, H', W')`` float32, C-contiguous (:meth:`output_size`).
        """
        a = np.asarray(x)
        if a.ndim == 4:
            if a.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {a.shape[0]}")
            a = a[0]
        if a.ndim != 3 or a.shape[0] != self.in_channels:
            raise ValueError(f"expected (1, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                             f"got {tuple(np.shape(x))}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        _, height, width = a.shape
        if height < 1 or width < 1:
            raise ValueError(f"empty image {height}x{width}")
        out_h, out_w = self.output_size(height, width)
        out = np.empty((1, self.out_channels, out_h, out_w), dtype=np.float32)
        with self._lock:
            ws = self._workspace_for(height, width)
            rc = self._lib.rnnpool_front(a.ctypes.data, self.in_channels, height, width, *self._params,
                                         ws.ctypes.data, ws.size, out.ctypes.data)
        if rc != 0:
            raise RuntimeError(f"rnnpool_front failed: {_ERRORS.get(rc, rc)}")
        return out

    def activations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The C code's ``tanh`` and ``sigmoid`` of ``x`` (float32; for tests)."""
        a = _f32(x).ravel()
        t, s = np.empty_like(a), np.empty_like(a)
        self._lib.rnnpool_front_activations(a.size, _ptr(a), _ptr(t), _ptr(s))
        return t, s


class NativeDetector(Detector):
    """:class:`Detector` running the front (normalisation, stem, RNNPool) in C (:class:`NativeFront`) and the rest of
    the network (MBConv blocks, heads) in onnxruntime (:func:`detector.export.onnx.export_onnx_after_rnnpool`).

    Both halves take any input size, so images are resized to the model's input *area* like the torch backend (the
    paper's protocol); outputs match the torch backend to float32 rounding.

    Args:
        weights: torch weights or checkpoint (default: the shipped weights of ``model``).
        model: variant name for the default weights.
        score_threshold, nms_iou, max_detections: as for :class:`Detector`.
        threads: threads of the C front and of onnxruntime's pool for the rest. The pool stops spinning when a
            run returns; otherwise its idle workers spin on and take the cores from the front's threads of the next
            frame (network per 320x240 frame on 2 cores: 1.5 ms; 2.4 ms with spinning workers; 1.9 ms with
            onnxruntime on 1 thread).
        onnx_path: the exported network after RNNPool (default: exported on first use into the cache; see
            :func:`detector.backends.cached_onnx`).

    Raises:
        NativeUnavailable: no C compiler to build the front.
        detector.checkpoint.WeightsError: missing or unreadable weights.
    """

    def __init__(self, weights: str | Path | None = None, model: str | None = None, score_threshold: float = 0.5,
                 nms_iou: float = DEFAULT_NMS_IOU, max_detections: int = 750, threads: int = 2,
                 onnx_path: str | Path | None = None) -> None:
        from detector.backends import cached_onnx
        from detector.checkpoint import WeightsError
        from detector.export.onnx import PART_AFTER_RNNPOOL, onnx_session

        super().__init__(weights=weights, model=model, score_threshold=score_threshold, nms_iou=nms_iou,
                         max_detections=max_detections, resize="area")
        self.front = NativeFront(self.model, threads=threads)
        path = Path(onnx_path) if onnx_path is not None else cached_onnx(self.weights_path, part=PART_AFTER_RNNPOOL)
        self.session, config, part = onnx_session(path, threads=threads, spin_after_run=False)
        if part != PART_AFTER_RNNPOOL or config != self.config:
            raise WeightsError(f"{path} is not the network after RNNPool of {self.weights_path}")

    def run_network(self, x: np.ndarray) -> tuple[Tensor, Tensor]:
        cls_logits, box_deltas = self.session.run(None, {"pooled": self.front(x)})
        return torch.from_numpy(cls_logits), torch.from_numpy(box_deltas)
