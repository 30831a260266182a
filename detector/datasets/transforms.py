"""Training and evaluation augmentation built on albumentations, with box and ignore-region bookkeeping.

Model input convention: exactly ``input_size = (width, height)`` pixels, uint8, RGB ``(H, W, 3)`` or, for mono
models, ``(H, W, 1)``. Boxes are ``xyxy`` continuous pixel coordinates of the image they accompany.

Ignore regions travel through albumentations in the same bbox array as the objects, labelled
:data:`IGNORE_LABEL`, so every geometric step moves them identically; they are split off again at the end.
"""

from __future__ import annotations

import math
import random
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.augmentations.geometric import functional as fgeometric
from albumentations.core.transforms_interface import BaseTransformInitSchema

__all__ = [
    "IGNORE_LABEL",
    "DetectionTransform",
    "SmallObjectZoomCrop",
    "build_eval_transform",
    "build_train_transform",
]

#: Label carried by ignore regions inside the albumentations pipeline.
IGNORE_LABEL = -1
# Boxes a training crop leaves narrower/shorter than this (output pixels) are dropped: only zero-size remnants.
_MIN_CROPPED_SIDE = 0.01
# Our Compose has the single label field "labels": albumentations appends it as column 4 of its internal bbox array.
_LABEL_COLUMN = 4


class SmallObjectZoomCrop(BaseCrop):
    """Crop a window of the output aspect ratio, mostly zoomed so that a random object lands at a small size.

    One of three modes per call (S3FD/PyramidBox-style data-anchor sampling):

    * zoom (``zoom_prob``): pick a random object (not an ignore region), draw a target side ``t`` log-uniformly in
      ``object_size_range`` (pixels of the *output* image), and crop the window that, resized to ``output_size``,
      shows that object at side ``t`` (``sqrt(w * h)``), placed randomly so that it contains the object. The
      magnification is capped at ``max_upscale`` (output pixels per input pixel), and a window that would exceed the
      image is shrunk to fit (no padding), so the object may end larger than ``t``.
    * random crop (``random_crop_prob``): a window of the output aspect ratio covering a random fraction
      ``random_crop_area`` of the largest such window, at a random position.
    * full image (remaining probability): no crop (the later resize then matches evaluation).

    Objects whose centre falls outside the window are dropped; objects cut with their centre inside are clipped
    (by albumentations' bbox filter). Ignore regions are kept whenever they overlap the window.
    The window has integer corners in pixels of the input image; the output is not resized here (follow with
    ``A.Resize``). The mode and window are drawn from the transform's albumentations random state.

    Targets: image, bboxes. Ignore regions are recognised by the value ``IGNORE_LABEL`` in the first label field
    (albumentations' internal column 4), so the Compose must list that field first.
    """

    class InitSchema(BaseTransformInitSchema):
        output_size: tuple[int, int]
        object_size_range: tuple[float, float]
        zoom_prob: float
        random_crop_prob: float
        random_crop_area: tuple[float, float]
        max_upscale: float

    def __init__(
        self,
        output_size: tuple[int, int],
        object_size_range: tuple[float, float] = (8.0, 64.0),
        zoom_prob: float = 0.6,
        random_crop_prob: float = 0.2,
        random_crop_area: tuple[float, float] = (0.3, 1.0),
        max_upscale: float = 4.0,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if zoom_prob < 0 or random_crop_prob < 0 or zoom_prob + random_crop_prob > 1:
            raise ValueError("zoom_prob and random_crop_prob must be >= 0 with a sum <= 1")
        if not 0 < object_size_range[0] <= object_size_range[1]:
            raise ValueError(f"bad object_size_range {object_size_range}")
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.object_size_range = (float(object_size_range[0]), float(object_size_range[1]))
        self.zoom_prob = zoom_prob
        self.random_crop_prob = random_crop_prob
        self.random_crop_area = random_crop_area
        self.max_upscale = max_upscale

    @property
    def targets_as_params(self) -> list[str]:
        return ["bboxes"]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("output_size", "object_size_range", "zoom_prob", "random_crop_prob", "random_crop_area",
                "max_upscale")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))
        if bboxes.ndim == 2 and bboxes.shape[1] > _LABEL_COLUMN:
            objects = bboxes[bboxes[:, _LABEL_COLUMN] != IGNORE_LABEL, :4]
        else:
            objects = bboxes.reshape(-1, bboxes.shape[-1] if bboxes.ndim == 2 else 4)[:, :4]
        u = self.py_random.random()
        if u < self.zoom_prob and len(objects):
            box = objects[self.py_random.randrange(len(objects))] * np.array([width, height, width, height])
            window = self._zoom_window(box, width, height)
        elif u < self.zoom_prob + self.random_crop_prob:
            window = self._random_window(width, height)
        else:
            window = (0, 0, width, height)
        return {"crop_coords": window}

    def _aspect_window(self, width: int, height: int, cw: float, ch: float) -> tuple[float, float]:
        """Shrink ``(cw, ch)`` uniformly so that it fits in the image."""
        shrink = min(1.0, width / cw, height / ch)
        return cw * shrink, ch * shrink

    def _zoom_window(self, box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
        out_w, out_h = self.output_size
        side = max(math.sqrt(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)), 1.0)
        lo, hi = self.object_size_range
        target = math.exp(self.py_random.uniform(math.log(lo), math.log(hi)))
        scale = min(target / side, self.max_upscale)  # output pixels per input pixel
        cw, ch = self._aspect_window(width, height, out_w / scale, out_h / scale)
        # Window origin range that keeps the object inside (empty when the object is wider: centre it then).
        x_lo, x_hi = max(0.0, box[2] - cw), min(box[0], width - cw)
        y_lo, y_hi = max(0.0, box[3] - ch), min(box[1], height - ch)
        x0 = self.py_random.uniform(x_lo, x_hi) if x_lo <= x_hi else (box[0] + box[2] - cw) / 2
        y0 = self.py_random.uniform(y_lo, y_hi) if y_lo <= y_hi else (box[1] + box[3] - ch) / 2
        return self._to_int_window(x0, y0, cw, ch, width, height)

    def _random_window(self, width: int, height: int) -> tuple[int, int, int, int]:
        out_w, out_h = self.output_size
        # Largest window of the output aspect ratio inside the image.
        max_w, max_h = self._aspect_window(width, height, float(max(width, height * out_w / out_h)),
                                           float(max(height, width * out_h / out_w)))
        side = math.sqrt(self.py_random.uniform(*self.random_crop_area))
        cw, ch = max_w * side, max_h * side
        x0 = self.py_random.uniform(0.0, width - cw)
        y0 = self.py_random.uniform(0.0, height - ch)
        return self._to_int_window(x0, y0, cw, ch, width, height)

    @staticmethod
    def _to_int_window(
        x0: float, y0: float, cw: float, ch: float, width: int, height: int
    ) -> tuple[int, int, int, int]:
        """Integer window of about ``cw x ch`` at ``(x0, y0)``, moved/shrunk to lie inside the image."""
        w_int = min(max(round(cw), 1), width)
        h_int = min(max(round(ch), 1), height)
        x_int = min(max(int(x0), 0), width - w_int)
        y_int = min(max(int(y0), 0), height - h_int)
        return x_int, y_int, x_int + w_int, y_int + h_int

    def apply_to_bboxes(self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        if len(bboxes):
            height, width = params["shape"][:2]
            x0, y0, x1, y1 = crop_coords
            cx = (bboxes[:, 0] + bboxes[:, 2]) * (0.5 * width)
            cy = (bboxes[:, 1] + bboxes[:, 3]) * (0.5 * height)
            centre_in = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
            if bboxes.shape[1] > _LABEL_COLUMN:
                centre_in |= bboxes[:, _LABEL_COLUMN] == IGNORE_LABEL
            bboxes = bboxes[centre_in]
        return super().apply_to_bboxes(bboxes, crop_coords, **params)


class DetectionTransform:
    """Callable wrapper around an albumentations pipeline for images with object boxes and ignore regions.

    Call with ``(image, boxes_xyxy, labels, ignore_xyxy)``:

    * ``image``: uint8 ``(H, W, 3)`` RGB, or ``(H, W)`` / ``(H, W, 1)`` gray (only for ``grayscale`` pipelines).
    * ``boxes_xyxy``: ``(G, 4)`` pixels of ``image``; ``labels``: ``(G,)`` int, 1-based; ``ignore_xyxy``: ``(I, 4)``.

    Returns ``(image, boxes_xyxy, labels, ignore_xyxy)`` transformed: image uint8 ``(h, w, 3)`` RGB or ``(h, w, 1)``
    for ``grayscale``, ``(h, w)`` being the pipeline's output size; boxes float32 in pixels of the returned image,
    labels int64, ignore float32.
    """

    def __init__(self, color: A.Compose, gray_input: A.Compose | None, grayscale: bool) -> None:
        """Args:
        color: pipeline for 3-channel RGB input.
        gray_input: pipeline for 1-channel input (``grayscale`` only; it lacks the RGB-to-gray step).
        grayscale: whether the output is single-channel.
        """
        self.color = color
        self.gray_input = gray_input
        self.grayscale = grayscale

    def set_seed(self, seed: int | None) -> None:
        """Reseed the random state (call once per DataLoader worker; ``None`` draws fresh entropy)."""
        for compose in (self.color, self.gray_input):
            if compose is not None:
                compose.set_random_seed(seed)

    def __call__(
        self,
        image: np.ndarray,
        boxes_xyxy: np.ndarray,
        labels: np.ndarray,
        ignore_xyxy: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        ignore = np.zeros((0, 4), np.float32) if ignore_xyxy is None else np.asarray(ignore_xyxy, np.float32)
        ignore = ignore.reshape(-1, 4)
        all_labels = np.concatenate((np.asarray(labels, dtype=np.int64).reshape(-1),
                                     np.full(len(ignore), IGNORE_LABEL, dtype=np.int64)))
        single_channel = image.ndim == 2 or image.shape[2] == 1
        if single_channel:
            if not self.grayscale:
                raise ValueError("a colour pipeline got a single-channel image")
            compose = self.gray_input
        else:
            compose = self.color
        out = compose(image=image, bboxes=np.concatenate((boxes, ignore)), labels=all_labels)
        img = out["image"]
        if img.ndim == 2:
            img = img[:, :, None]
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"]).astype(np.int64).reshape(-1)
        is_obj = out_labels != IGNORE_LABEL
        return np.ascontiguousarray(img), out_boxes[is_obj], out_labels[is_obj], out_boxes[~is_obj]


class _TrainResize(A.Resize):
    """``A.Resize`` that uses area interpolation only when shrinking by more than 2x, bilinear otherwise.

    cv2's INTER_AREA costs ~1 ms at non-integer ratios on a 640 px image (ten times bilinear), while bilinear up to
    a 2x shrink still averages every input pixel (cv2 samples between pixel centres), so aliasing stays negligible.
    """

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        shrink = max(width / self.width, height / self.height)
        interpolation = cv2.INTER_AREA if shrink > 2.0 else self.interpolation
        return fgeometric.resize(img, (self.height, self.width), interpolation=interpolation)


def _bbox_params(min_side: float) -> A.BboxParams:
    # Clip and filter once at the end (boxes stay exact through crop/resize/flip unclipped). The filter keeps any
    # box with area left; min_side only removes boxes a crop clipped to zero size (albumentations keeps those at
    # min_area=0 and then fails validating them).
    return A.BboxParams(
        format="pascal_voc", label_fields=["labels"], clip=True, min_area=0.0, min_visibility=0.0,
        min_width=min_side, min_height=min_side, check_each_transform=False,
    )


def _resize(input_size: tuple[int, int], train: bool = False) -> A.Resize:
    """Resize to ``input_size``; evaluation matches inference preprocessing (area when shrinking, else bilinear)."""
    width, height = input_size
    if train:
        return _TrainResize(height=height, width=width, interpolation=cv2.INTER_LINEAR)
    return A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")


def _compose(steps: list[Any], seed: int | None, min_side: float = 0.0) -> A.Compose:
    return A.Compose(
        [s for s in steps if s is not None], bbox_params=_bbox_params(min_side), seed=seed, strict=False
    )


def build_train_transform(
    input_size: tuple[int, int],
    grayscale: bool = False,
    object_size_range: tuple[float, float] = (8.0, 64.0),
    zoom_prob: float = 0.6,
    random_crop_prob: float = 0.2,
    flip_prob: float = 0.5,
    photometric_prob: float = 0.8,
    seed: int | None = None,
) -> DetectionTransform:
    """Training augmentation: small-object zoom crop, resize, flip, photometric distortion, optional grayscale.

    Order: :class:`SmallObjectZoomCrop` (window of the output aspect ratio) -> resize to ``input_size``
    (area interpolation when shrinking more than 2x, else bilinear) -> horizontal flip -> RGB-to-gray for mono
    models -> brightness/contrast, gamma and, for colour, hue/saturation. Photometric steps run on the small output
    image, which keeps a sample at about 1 ms (one core) for a 640 px source and a 320x240 output.

    Args:
        input_size: model input ``(width, height)`` in pixels.
        grayscale: mono model: output ``(H, W, 1)`` (RGB input is converted; gray input is accepted).
        object_size_range: ``(min, max)`` side in output pixels that the zoomed-on object is scaled to.
        zoom_prob: probability of the zoom crop; ``random_crop_prob`` that of a plain random crop; the rest uses
            the full image.
        random_crop_prob: see ``zoom_prob``.
        flip_prob: probability of a horizontal flip.
        photometric_prob: probability of the brightness/contrast distortion (gamma and hue/saturation scale with it).
        seed: seed of the albumentations random state; ``None`` draws it from Python's global :mod:`random`, so
            ``random.seed(...)`` beforehand makes training reproducible. :class:`DetectionDataset` reseeds each
            DataLoader worker from the worker's seed (:meth:`DetectionTransform.set_seed`).

    Returns:
        A :class:`DetectionTransform`.
    """
    width, height = input_size
    if seed is None:
        seed = random.getrandbits(32)

    def steps(to_gray: bool, colour: bool) -> list[Any]:
        return [
            SmallObjectZoomCrop(
                output_size=(width, height),
                object_size_range=object_size_range,
                zoom_prob=zoom_prob,
                random_crop_prob=random_crop_prob,
            ),
            _resize(input_size, train=True),
            A.HorizontalFlip(p=flip_prob),
            A.ToGray(num_output_channels=1, p=1.0) if to_gray else None,
            A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=photometric_prob),
            A.RandomGamma(gamma_limit=(70, 150), p=photometric_prob * 0.4),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=30, val_shift_limit=0, p=photometric_prob * 0.6)
            if colour
            else None,
        ]

    if grayscale:
        return DetectionTransform(
            _compose(steps(True, False), seed, _MIN_CROPPED_SIDE),
            _compose(steps(False, False), seed, _MIN_CROPPED_SIDE),
            True,
        )
    return DetectionTransform(_compose(steps(False, True), seed, _MIN_CROPPED_SIDE), None, False)


def build_eval_transform(input_size: tuple[int, int], grayscale: bool = False) -> DetectionTransform:
    """Evaluation preprocessing: plain resize of the whole image to ``input_size`` (aspect ratio not kept).

    Boxes are scaled by ``(out_w / in_w, out_h / in_h)`` exactly.

    Args:
        input_size: model input ``(width, height)`` in pixels.
        grayscale: output ``(H, W, 1)`` gray (luma of the RGB input, or the gray input as is).

    Returns:
        A deterministic :class:`DetectionTransform`.
    """
    if grayscale:
        return DetectionTransform(
            _compose([_resize(input_size), A.ToGray(num_output_channels=1, p=1.0)], seed=0),
            _compose([_resize(input_size)], seed=0),
            True,
        )
    return DetectionTransform(_compose([_resize(input_size)], seed=0), None, False)
