"""Image transforms: BLIP's train/test pipelines (CLIP normalisation), RandomAugment, and DeiT's.

RandomAugment follows BLIP's OpenCV implementation (same ten operations, same level-to-magnitude
mapping, same NumPy draw order) but runs on uint8 tensors (torchvision's functional API for the
colour ops, ``grid_sample`` for the geometric ones), so no OpenCV is needed. Where the two can
differ numerically:

* Shear, translate and rotate use OpenCV's own matrices and border rule (constant (128, 128, 128)
  blended into edge pixels by the out-of-image bilinear weight; torchvision's ``affine`` fill rule
  also scales the in-image part) but sample with float bilinear weights, where OpenCV quantises
  source coordinates to 1/32 pixel: single pixels may differ by one grey level.
* Sharpness at factors other than 1 uses torchvision's kernel, which clamps where BLIP's uint8
  cast wraps around and keeps the one-pixel border at factor 0. At BLIP's M=5 the Brightness and
  Sharpness factors are exactly 1.0, so both ops are identities there.
* AutoContrast and Equalize give the same bytes as BLIP's (PIL-matching) versions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10
_TRANSLATE_CONST = 10.0  # pixels at level MAX_LEVEL, independent of the image size (as in BLIP)
_SIGNED_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


def op_magnitude(name: str, level: float) -> float | None:
    """Unsigned magnitude of ``name`` at ``level`` (of ``MAX_LEVEL``); None for parameterless ops."""
    if name in ("Identity", "AutoContrast", "Equalize"):
        return None
    if name in ("Brightness", "Sharpness"):
        return (level / MAX_LEVEL) * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return (level / MAX_LEVEL) * 0.3  # a shear-matrix coefficient, not an angle
    if name in ("TranslateX", "TranslateY"):
        return (level / MAX_LEVEL) * _TRANSLATE_CONST
    if name == "Rotate":
        return (level / MAX_LEVEL) * 30.0
    raise ValueError(f"unknown RandomAugment op {name!r}; known: {', '.join(OPS)}")


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    # A per-channel float64 lookup table truncated to uint8, as PIL does (torchvision divides in
    # float32, which can land one grey level lower).
    levels = torch.arange(256, dtype=torch.float64)
    tables = []
    for ch in img:
        low, high = int(ch.min()), int(ch.max())
        if high <= low:
            tables.append(levels)
        else:
            scale = 255.0 / (high - low)
            tables.append((levels * scale - low * scale).clamp(0, 255))
    table = torch.stack(tables).to(torch.uint8)
    return table.gather(1, img.reshape(img.shape[0], -1).long()).view_as(img)


def opencv_affine_matrix(name: str, magnitude: float, height: int, width: int) -> np.ndarray:
    """The forward 2x3 matrix BLIP hands to ``cv2.warpAffine`` (pixel centres at integer coordinates)."""
    m = magnitude
    if name == "ShearX":
        return np.array([[1.0, m, 0.0], [0.0, 1.0, 0.0]])
    if name == "ShearY":
        return np.array([[1.0, 0.0, 0.0], [m, 1.0, 0.0]])
    if name == "TranslateX":
        return np.array([[1.0, 0.0, -m], [0.0, 1.0, 0.0]])
    if name == "TranslateY":
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -m]])
    if name == "Rotate":
        # cv2.getRotationMatrix2D((W / 2, H / 2), m, 1): counter-clockwise for positive m
        cos, sin = math.cos(math.radians(m)), math.sin(math.radians(m))
        cx, cy = width / 2, height / 2
        return np.array([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]])
    raise ValueError(f"{name!r} is not a geometric RandomAugment op")


def _warp(img: torch.Tensor, forward: np.ndarray, fill: Sequence[float]) -> torch.Tensor:
    """Bilinear warp with OpenCV's constant-border rule: out = sum(w_in * v) + sum(w_out) * fill.

    The sampling grid is built by broadcasting rather than ``affine_grid``'s batched matmul, which
    is an order of magnitude slower on small CPU images.
    """
    channels, height, width = img.shape
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))
    xs = torch.arange(width, dtype=torch.float64)[None, :]
    ys = torch.arange(height, dtype=torch.float64)[:, None]
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    # grid_sample(align_corners=False) puts pixel i's centre at (2i + 1) / size - 1
    grid = torch.stack([(2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1], dim=-1)
    stacked = torch.cat([img.float(), torch.ones(1, height, width)])[None]
    warped = torch.nn.functional.grid_sample(
        stacked, grid[None].float(), mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    values, inside = warped[:channels], warped[channels:]
    out = values + (1.0 - inside) * torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1)
    return torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)


def apply_op(
    img: torch.Tensor, name: str, magnitude: float | None = None, fill: Sequence[float] = (128, 128, 128)
) -> torch.Tensor:
    """Apply one RandomAugment op to a uint8 (3, H, W) tensor with a signed ``magnitude``.

    Geometric ops use OpenCV's conventions (see ``opencv_affine_matrix``): ShearX maps x to
    x + m*y about the top-left pixel, TranslateX moves content by -m pixels, Rotate turns
    counter-clockwise by m degrees about (W/2, H/2).
    """
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return _autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if magnitude is None:
        raise ValueError(f"RandomAugment op {name!r} needs a magnitude")
    if name == "Brightness":
        return img if magnitude == 1.0 else F.adjust_brightness(img, magnitude)
    if name == "Sharpness":
        return img if magnitude == 1.0 else F.adjust_sharpness(img, magnitude)
    if name in _SIGNED_OPS:
        return _warp(img, opencv_affine_matrix(name, magnitude, *img.shape[-2:]), fill)
    raise ValueError(f"unknown RandomAugment op {name!r}; known: {', '.join(OPS)}")


class RandomAugment:
    """BLIP's RandomAugment: ``n`` ops drawn with replacement, each applied with probability ``prob``.

    Randomness comes from NumPy's global generator in BLIP's order (op indices, then per op an
    apply draw and, for signed ops, a sign draw), so a given NumPy state picks the same ops and
    signs as BLIP; this is also what makes per-worker NumPy seeding matter (see ``create_loader``).
    Accepts a PIL image or a uint8 (3, H, W) tensor; returns a uint8 (3, H, W) tensor.
    """

    def __init__(
        self,
        n: int = 2,
        m: float = 5,
        ops: Sequence[str] = OPS,
        prob: float = 0.5,
        fill: Sequence[float] = (128, 128, 128),
    ) -> None:
        unknown = [op for op in ops if op not in OPS]
        if unknown:
            raise ValueError(f"unknown RandomAugment ops {unknown}; known: {', '.join(OPS)}")
        self.n, self.m, self.ops, self.prob, self.fill = n, m, tuple(ops), prob, tuple(fill)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = F.pil_to_tensor(img.convert("RGB"))
        if img.dtype != torch.uint8 or img.ndim != 3:
            raise TypeError(f"RandomAugment expects a uint8 (C, H, W) tensor, got {img.dtype} {tuple(img.shape)}")
        for i in np.random.choice(len(self.ops), self.n):
            name = self.ops[i]
            if np.random.random() > self.prob:
                continue
            magnitude = op_magnitude(name, self.m)
            if name in _SIGNED_OPS:
                # BLIP's sign draws: shear/translate negate on > 0.5, rotate on < 0.5
                draw = np.random.random()
                if (draw < 0.5) if name == "Rotate" else (draw > 0.5):
                    magnitude = -magnitude
            img = apply_op(img, name, magnitude, self.fill)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, m={self.m}, ops={list(self.ops)})"


def _get(config: Mapping | None, key: str, default: Any) -> Any:
    return default if config is None or config.get(key) is None else config[key]


def build_transform(split: str, image_size: int, config: Mapping | None = None) -> v2.Compose:
    """BLIP's pipelines; ``split`` is "train" or an evaluation split ("val", "test", "eval").

    Config switches: ``hflip`` (default true), ``randaug`` (default true), ``crop_scale``
    (default [0.5, 1.0]; [1.0, 1.0] means no crop, the whole picture resized as for evaluation). The
    synthetic data turns off flips because a flip breaks its left/right statements, as it does for
    NLVR2's, where BLIP nonetheless flips.
    """
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD), v2.ToPureTensor()]
    resize = v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    if split != "train":
        return v2.Compose([resize, v2.ToImage(), *normalize])
    scale = tuple(float(s) for s in _get(config, "crop_scale", (0.5, 1.0)))
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(scale)}")
    crop = v2.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC)
    steps: list[Any] = [resize if scale == (1.0, 1.0) else crop]
    if _get(config, "hflip", True):
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToImage())
    if _get(config, "randaug", True):
        steps.append(RandomAugment(2, 5))
    return v2.Compose([*steps, *normalize])


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
ERASE_MODES = ("const", "rand", "pixel")


def _interpolation(config: Mapping | None, key: str, fallback: str) -> str:
    mode = _get(config, key, fallback)
    if mode not in INTERPOLATIONS:
        raise ValueError(f"{key} must be one of {INTERPOLATIONS}, got {mode!r}")
    return mode


def timm_auto_augment(policy: Any) -> str:
    """A timm auto-augment string checked by timm's own parser ("" = off); ``policy`` False or None is off too
    (BLIP's boolean ``randaug`` switch, which the ImageNet pipeline does not use)."""
    if policy is None or policy is False or policy == "":
        return ""
    if not isinstance(policy, str):
        raise ValueError(
            f"randaug must be a timm auto-augment string such as 'rand-m9-mstd0.5-inc1' ('' = off), got {policy!r}"
        )
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    build = rand_augment_transform if policy.startswith("rand") else auto_augment_transform
    build = augment_and_mix_transform if policy.startswith("augmix") else build
    try:
        build(policy, {})
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ValueError(
            f"randaug {policy!r} is not a timm auto-augment string (timm: {e or type(e).__name__})"
        ) from None
    return policy


def build_imagenet_transform(split: str, image_size: int, config: Mapping | None = None) -> Any:
    """DeiT's pipelines; the classification task fills the keys from its recipe (tasks/classification.py), and a
    bare call gets the plain one.

    Evaluation, one protocol for every model: resize the shorter side to ``int(image_size / eval_crop_ratio)``
    (ratio default 0.875) with ``interpolation`` (default "bicubic"), centre crop, ImageNet mean/std.

    Train: RandomResizedCrop (``crop_scale``, default [0.08, 1.0]; ``train_interpolation``, default
    ``interpolation``) and a horizontal flip (``hflip``). When RandAugment (``randaug``, a timm auto-augment
    string), colour jitter (``color_jitter`` > 0) or random erasing (``reprob`` > 0, ``remode``, ``recount``) is
    on, the pipeline is timm's ``create_transform``, built as DeiT builds it, so that its ops and their
    parameters are timm's own (the factory skips the jitter when RandAugment is on). Otherwise it is the
    torchvision pipeline, which draws crops by the same algorithm and keeps the plain recipe's bytes.
    Mixup/cutmix and repeated augmentation act on batches and on the sampler: see the task and
    ``data.samplers``.
    """
    normalize = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ]
    interpolation = _interpolation(config, "interpolation", "bicubic")
    if split != "train":
        ratio = float(_get(config, "eval_crop_ratio", 0.875))
        if not 0 < ratio <= 1:
            raise ValueError(f"eval_crop_ratio must be in (0, 1], got {ratio}")
        resize = v2.Resize(int(image_size / ratio), interpolation=InterpolationMode(interpolation))
        return v2.Compose([resize, v2.CenterCrop(image_size), *normalize])
    train_interpolation = _interpolation(config, "train_interpolation", interpolation)
    scale = tuple(float(s) for s in _get(config, "crop_scale", (0.08, 1.0)))
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(scale)}")
    hflip = bool(_get(config, "hflip", True))
    policy = timm_auto_augment(_get(config, "randaug", ""))
    jitter = float(_get(config, "color_jitter", 0.0))
    reprob = float(_get(config, "reprob", 0.0))
    if policy or jitter > 0 or reprob > 0:
        from timm.data import create_transform

        remode = _get(config, "remode", "pixel")
        if remode not in ERASE_MODES:
            raise ValueError(f"remode must be one of {ERASE_MODES}, got {remode!r}")
        return create_transform(
            image_size,
            is_training=True,
            scale=scale,
            hflip=0.5 if hflip else 0.0,
            color_jitter=jitter if jitter > 0 else None,
            auto_augment=policy or None,
            interpolation=train_interpolation,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            re_prob=reprob,
            re_mode=remode,
            re_count=int(_get(config, "recount", 1)),
        )
    steps: list[Any] = [
        v2.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode(train_interpolation))
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *normalize])
