"""Discovery, datalists, the built-in synthetic dataset, MONAI transforms, datasets and loaders for 3D volumes and
2D images.

The functions take the validated ``data`` section of the settings (:class:`monai_diffusion.settings.DataSettings`);
every check of the configuration itself happens there, once, before this module reads anything. What only the files
can tell (folders, datalists, headers, channel counts) is checked here before any volume is loaded, and every error
names the file and what was expected.

Typical use::

    settings = load_settings("config.yaml")
    train_ds, val_ds, info = build_datasets(settings.data, spatial_dims=3, in_channels=1, work_dir=run_dir)
    train_loader, val_loader = build_loaders(train_ds, val_ds, batch_size=2, num_workers=settings.data.num_workers)

Volumes are NIfTI (``.nii``, ``.nii.gz``); with ``spatial_dims=2`` also PNG, JPEG and TIFF images (MONAI's
``PILReader``). ``info["affine"]`` is the affine of the first training volume after the (deterministic) transforms:
write generated volumes with it to get the training data's voxel size and orientation.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch

from .errors import DataError
from .synthetic import make_synthetic_dataset

if TYPE_CHECKING:  # the settings module validates; this one only reads the validated section
    from .settings import DataSettings

__all__ = [
    "DataError",
    "NIFTI_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "discover_images",
    "load_datalist",
    "make_synthetic_dataset",
    "check_files",
    "build_transforms",
    "build_datasets",
    "build_loaders",
    "uses_random_patches",
    "validates_whole_volumes",
    "training_geometry",
]

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
# 2D images read through PIL (only with spatial_dims=2)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
READ_ERROR_POLICIES = ("fail", "skip")
# Bump when the transform chain changes in a way that invalidates PersistentDataset caches.
_TRANSFORM_VERSION = 2
_MAX_LISTED_PROBLEMS = 20
# nibabel affines map to RAS+ world coordinates.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
logger = logging.getLogger(__name__)




# ----------------------------------------------------------------------------------------------
# Discovery and datalists
# ----------------------------------------------------------------------------------------------


def _is_nifti_name(name: str) -> bool:
    low = name.lower()
    return low.endswith(".nii") or low.endswith(".nii.gz")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _readable(name: str, spatial_dims: int) -> bool:
    return _is_nifti_name(name) or (spatial_dims == 2 and _is_image_name(name))


def discover_images(folder: str | os.PathLike, spatial_dims: int = 3) -> list[str]:
    """Sorted volumes directly inside ``folder`` (not recursive): ``.nii`` / ``.nii.gz``, and with
    ``spatial_dims=2`` also ``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``.

    Hidden files (names starting with ``.``, e.g. macOS ``._x.nii.gz`` resource forks) are ignored.

    Raises:
        DataError: the folder does not exist, is not a folder, or holds no usable files (the message says
            whether such files exist in its subfolders; use a datalist for nested layouts).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise DataError(f"data folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} is not a folder")
    files = sorted(
        os.path.abspath(p) for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and _readable(p.name, spatial_dims)
    )
    kinds = ", ".join("*" + e for e in NIFTI_EXTENSIONS + (IMAGE_EXTENSIONS if spatial_dims == 2 else ()))
    if not files:
        nested = [
            sub.name
            for sub in sorted(path.iterdir())
            if sub.is_dir() and any(_readable(p.name, spatial_dims) and p.is_file() for p in sub.iterdir())
        ]
        hint = ""
        if nested:
            hint = (
                f"; such files were found in subfolder(s) {nested[:5]} but discovery is not recursive: "
                "point data.train_data_dir / data.val_data_dir at the folder holding the files, or use data.datalist"
            )
        elif spatial_dims == 3 and any(_is_image_name(p.name) for p in path.iterdir()):
            hint = "; it holds 2D images, which need --set autoencoder.spatial_dims=2 --set diffusion.spatial_dims=2"
        raise DataError(f"no volumes ({kinds}) found in folder {str(path)!r}{hint}")
    return files


def load_datalist(path: str | os.PathLike, key: str, missing_ok: bool = False) -> list[dict]:
    """Read the ``key`` list (e.g. ``"training"``) of a decathlon-style JSON datalist.

    Each entry is ``{"image": "path.nii.gz", ...}`` (a bare string is taken as the image path). Relative
    image paths are resolved against the JSON file's folder; extra keys (``"label"``, ``"age"``, ...) are
    kept as they are.

    Args:
        path: the JSON file.
        key: the list to read.
        missing_ok: return ``[]`` instead of raising when ``key`` is absent.

    Raises:
        DataError: unreadable JSON, missing key, malformed entry, or image files that do not exist
            (all missing files are listed with the entry index).
    """
    jpath = Path(path).expanduser()
    if not jpath.is_file():
        raise DataError(f"datalist {str(jpath)!r} does not exist or is not a file")
    try:
        with open(jpath, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {str(jpath)!r} is not valid JSON: {e}") from e
    except OSError as e:
        raise DataError(f"datalist {str(jpath)!r} cannot be read: {e}") from e
    if not isinstance(content, dict):
        raise DataError(f"datalist {str(jpath)!r} must hold a JSON object with a {key!r} list, got {type(content).__name__}")
    if key not in content:
        if missing_ok:
            return []
        raise DataError(f"datalist {str(jpath)!r} has no key {key!r}; keys present: {sorted(content)}")
    entries = content[key]
    if not isinstance(entries, list):
        raise DataError(f"datalist {str(jpath)!r}: {key!r} must be a list of entries, got {type(entries).__name__}")

    base = Path(os.path.abspath(jpath)).parent
    out: list[dict] = []
    missing: list[str] = []
    for i, entry in enumerate(entries):
        where = f"datalist {str(jpath)!r}, {key}[{i}]"
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object with an 'image' path or a path string, got {entry!r}")
        if "image" not in entry:
            raise DataError(f"{where}: entry has no 'image' key (keys: {sorted(entry)})")
        image = entry["image"]
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: 'image' must be a single file path string, got {image!r}")
        resolved = Path(image).expanduser()
        if not resolved.is_absolute():
            resolved = base / resolved
        resolved = Path(os.path.abspath(resolved))  # normalizes "..", keeps symlinked names
        if not resolved.is_file():
            missing.append(f"{key}[{i}] image {image!r} -> {str(resolved)!r}")
        item = dict(entry)
        item["image"] = str(resolved)
        out.append(item)
    if missing:
        shown = "\n  ".join(missing[:_MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(missing) - _MAX_LISTED_PROBLEMS} more" if len(missing) > _MAX_LISTED_PROBLEMS else ""
        raise DataError(
            f"datalist {str(jpath)!r}: {len(missing)} image file(s) do not exist "
            f"(relative paths are resolved against {str(base)!r}):\n  {shown}{more}"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Header checks
# ----------------------------------------------------------------------------------------------


def _layout(shape: tuple[int, ...], spatial_dims: int) -> tuple[int | None, str | None]:
    """(channels, None) if a file of this shape fits ``spatial_dims``, else (None, reason)."""
    nd = len(shape)
    if spatial_dims == 3:
        if nd == 3:
            return 1, None
        if nd == 4:
            return shape[3], None
        if nd == 5 and shape[3] == 1:
            return shape[4], None
        if nd < 3:
            return None, f"has shape {shape}: a {nd}D image, but spatial_dims=3 expects (X, Y, Z) or (X, Y, Z, C)"
        return None, f"has shape {shape}: spatial_dims=3 expects (X, Y, Z), (X, Y, Z, C) or (X, Y, Z, 1, C)"
    if spatial_dims == 2:
        if nd == 2:
            return 1, None
        if nd == 3 and shape[2] == 1:
            return 1, None
        if nd == 4 and shape[2] == 1:
            return shape[3], None
        if nd == 5 and shape[2] == 1 and shape[3] == 1:
            return shape[4], None
        return None, (
            f"has shape {shape}: spatial_dims=2 expects 2D images (X, Y), (X, Y, 1) or (X, Y, 1, C)"
            + (f"; this looks like a 3D volume with {shape[2]} slices" if nd == 3 else "")
        )
    raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def _gzip_isize(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return int.from_bytes(f.read(4), "little")
    except OSError:
        return None


def _gzip_uncompressed_size(path: Path) -> int:
    total = 0
    with gzip.open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return total
            total += len(chunk)


_PIL_MODE_CHANNELS = {"1": 1, "L": 1, "P": 1, "I": 1, "F": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "LA": 2,
                      "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "CMYK": 4}


def _image_problem(path: Path, in_channels: int, spatial_dims: int) -> str | None:
    """Header checks of a 2D image file (PNG, JPEG, TIFF) through PIL, without decoding its pixels."""
    from PIL import Image

    if spatial_dims != 2:
        return "is a 2D image, but spatial_dims=3 expects NIfTI volumes"
    try:
        with Image.open(path) as img:
            mode, frames = img.mode, getattr(img, "n_frames", 1)
            img.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"cannot be read as an image ({type(e).__name__}: {e})"
    if frames > 1:
        return f"has {frames} frames (a stack); expected a single 2D image"
    channels = _PIL_MODE_CHANNELS.get(mode)
    if channels is None:
        return f"has unsupported image mode {mode!r}"
    if channels != in_channels:
        return f"is a {mode} image with {channels} channel(s), but in_channels={in_channels}"
    return None


def _header_problem(path: Path, in_channels: int, spatial_dims: int) -> str | None:
    """Why this file cannot be used (header-level checks only), or None if it looks fine."""
    if not path.exists():
        return "file does not exist"
    if not path.is_file():
        return "is not a file"
    if _is_image_name(path.name):
        return _image_problem(path, in_channels, spatial_dims)
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(img.get_data_dtype())
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types for corrupt files
        return f"cannot be read as a NIfTI image ({type(e).__name__}: {e})"
    if dtype.kind not in "biuf":
        return f"has unsupported voxel data type {dtype} (expected integer or floating point scalars)"
    if any(s < 1 for s in shape):
        return f"has an empty dimension, shape {shape}"
    rank = min(len(shape), 3)
    # degenerate = a zero or non-finite voxel size, or axes that (nearly) coincide; scale-free, so that microscopy
    # voxels of a few nm written in mm (determinant ~1e-14) are fine
    norms = np.linalg.norm(affine[:rank, :rank], axis=0)
    if (not np.all(np.isfinite(affine)) or np.any(norms <= 0)
            or abs(np.linalg.det(affine[:rank, :rank])) / np.prod(norms) < 1e-6):
        return f"has a degenerate affine (zero voxel size?):\n{affine}"
    channels, reason = _layout(shape, spatial_dims)
    if reason is not None:
        return reason
    if channels != in_channels:
        return (
            f"has shape {shape}: {channels} channel(s) (the dimension after the spatial ones), but "
            f"in_channels={in_channels}"
        )
    # Truncation: compare the file size the header implies with the (uncompressed) size on disk.
    offset = getattr(getattr(img, "dataobj", None), "offset", None)
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and isinstance(offset, (int, np.integer)):
        expected = int(offset) + int(np.prod(shape)) * dtype.itemsize
        name = path.name.lower()
        if name.endswith(".gz"):
            isize = _gzip_isize(path)
            if isize != expected % (1 << 32):
                # The gzip trailer disagrees (truncated, or a multi-member file): verify by decompressing.
                try:
                    actual = _gzip_uncompressed_size(path)
                except (OSError, EOFError, zlib.error) as e:
                    return f"compressed data is corrupt or truncated ({type(e).__name__}: {e})"
                if actual < expected:
                    return f"is truncated: {actual} bytes uncompressed, the header implies {expected}"
        elif name.endswith(".nii"):
            actual = path.stat().st_size
            if actual < expected:
                return f"is truncated: {actual} bytes, the header implies {expected}"
    return None


def _entry(item: str | os.PathLike | Mapping) -> dict:
    if isinstance(item, Mapping):
        if "image" not in item:
            raise DataError(f"data entry {dict(item)!r} has no 'image' key")
        return dict(item)
    return {"image": str(item)}


def check_files(
    files: Sequence[str | os.PathLike | Mapping],
    in_channels: int,
    spatial_dims: int,
    on_read_error: str = "fail",
) -> list[dict]:
    """Check every file's header (NIfTI, or PIL for 2D images; no voxel data loaded) before any expensive work.

    Detects missing, unreadable, corrupt or truncated files, unsupported data types, degenerate affines,
    shapes that do not fit ``spatial_dims`` and channel counts that differ from ``in_channels`` (channels are
    the 4th dimension for 3D data, or the 5th with a singleton 4th, as NIfTI stores vectors).

    Args:
        files: paths or datalist entries (``{"image": path, ...}``).
        in_channels: expected number of channels.
        spatial_dims: 2 or 3.
        on_read_error: ``"fail"``: raise one :class:`DataError` listing every bad file and why;
            ``"skip"``: ``warnings.warn`` for each bad file and drop it.

    Returns:
        The usable entries as dicts (``{"image": path, ...}``), in input order.

    Raises:
        DataError: with ``fail`` if any file is bad; with ``skip`` if no file is left.
    """
    if on_read_error not in READ_ERROR_POLICIES:
        raise DataError(f"on_read_error must be one of {list(READ_ERROR_POLICIES)}, got {on_read_error!r}")
    if spatial_dims not in (2, 3):
        raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    entries = [_entry(f) for f in files]
    good: list[dict] = []
    problems: list[str] = []
    for entry in entries:
        path = Path(entry["image"])
        reason = _header_problem(path, int(in_channels), int(spatial_dims))
        if reason is None:
            good.append(entry)
            continue
        message = f"{str(path)!r} {reason}"
        problems.append(message)
        if on_read_error == "skip":
            warnings.warn(f"skipping data file {message}", stacklevel=2)
    if problems and on_read_error == "fail":
        shown = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more" if len(problems) > _MAX_LISTED_PROBLEMS else ""
        raise DataError(
            f"{len(problems)} of {len(entries)} data file(s) failed the header check "
            f"(set data.on_read_error='skip' to drop them with a warning):\n  {shown}{more}"
        )
    if entries and not good:
        raise DataError(f"none of the {len(entries)} data file(s) is usable (all were skipped); first: {problems[0]}")
    return good


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def _squeeze_trailing_singleton(spatial_dims: int):
    """For 2D data stored as (X, Y, 1[, C]): drop the singleton third spatial axis.

    The 4x4 affine is kept, as MONAI does for NIfTI files stored as (X, Y)."""
    from monai.transforms import MapTransform, SqueezeDim

    class _SqueezeTrailingSpatiald(MapTransform):
        def __init__(self, keys):
            super().__init__(keys)
            self.squeeze = SqueezeDim(dim=-1, update_meta=False)

        def __call__(self, data):
            d = dict(data)
            for key in self.key_iterator(d):
                img = d[key]
                if img.ndim == spatial_dims + 2 and img.shape[-1] == 1:
                    d[key] = self.squeeze(img)
            return d

    return _SqueezeTrailingSpatiald(keys=["image"])


def _readers() -> tuple:
    """MONAI readers: NIfTI through nibabel, 2D images (PNG, JPEG, TIFF) through PIL, chosen by file name."""
    from monai.data import NibabelReader, PILReader
    from monai.data.utils import is_supported_format

    class _ImageReader(PILReader):
        def verify_suffix(self, filename) -> bool:
            return is_supported_format(filename, [e.lstrip(".") for e in IMAGE_EXTENSIONS])

    return NibabelReader(), _ImageReader()


def uses_random_patches(cfg: DataSettings) -> bool:
    """Whether training volumes are random ``voxel_size`` patches: ``crop_mode: random_patch`` or
    ``augmentation.use_patch_based: true`` (the seed system's spelling of the same thing).

    Args:
        cfg: the validated ``data`` settings.
    """
    return cfg.crop_mode == "random_patch" or bool(cfg.augmentation.use_patch_based)


def validates_whole_volumes(cfg: DataSettings) -> bool:
    """Whether validation items are whole volumes of any size (validated with sliding windows of ``voxel_size``,
    batch size 1): training uses random patches and ``augmentation.use_center_crop_for_val`` is null.

    Args:
        cfg: the validated ``data`` settings.
    """
    return uses_random_patches(cfg) and cfg.augmentation.use_center_crop_for_val is None


def training_geometry(cfg: DataSettings) -> DataSettings:
    """Data settings whose validation transforms (``build_transforms(..., train=False)``) give volumes as training
    sees them, deterministically: random patches become the centre ``voxel_size`` patch, and
    ``augmentation.use_center_crop_for_val`` is ignored. Unchanged when neither is used.

    Args:
        cfg: the validated ``data`` settings.
    """
    if not uses_random_patches(cfg) and cfg.augmentation.use_center_crop_for_val is None:
        return cfg
    return dataclasses.replace(
        cfg, crop_mode="pad_crop" if uses_random_patches(cfg) else cfg.crop_mode,
        augmentation=dataclasses.replace(cfg.augmentation, use_patch_based=False, use_center_crop_for_val=None),
    )


def _invert_intensity(img):
    """``max + min - value`` over the whole volume (all channels): the brightest voxel becomes the darkest."""
    return img.max() + img.min() - img


def build_transforms(
    cfg: DataSettings,
    spatial_dims: int,
    train: bool,
    divisible_by: Sequence[int] | int | None = None,
    whole_volume: bool = False,
):
    """MONAI dictionary transforms on key ``"image"``.

    Load (nibabel, meta kept: the output is a ``MetaTensor`` whose ``.affine`` follows every spatial
    transform) -> channel first -> optional reorientation to ``cfg.orientation`` -> optional resampling to
    ``cfg.spacing`` -> optional resize to ``cfg.voxel_resize`` (trilinear/bilinear)
    -> intensity scaling to [0, 1]: between two percentiles (per channel), or of the fixed ``cfg.intensity.range``
    (not for the built-in synthetic datasets, made in [0, 1]) -> optional inversion (``max + min - value`` per
    volume, ``cfg.augmentation.invert_intensity``) -> to ``voxel_size``:

    - training with random patches (:func:`uses_random_patches`): pad to at least ``voxel_size`` then a random
      ``voxel_size`` patch;
    - ``resize``: resample to ``voxel_size`` (trilinear/bilinear with anti-aliasing); with ``cfg.voxel_resize``
      set, a centre crop (padded with 0 where smaller) instead;
    - ``pad_crop``: center pad (with 0) / crop to ``voxel_size``;
    - validation: ``cfg.augmentation.use_center_crop_for_val`` true = centre crop (pad where smaller), false =
      resize; null = as in training, except that with random patches the whole volume is kept, padded to a
      multiple of ``divisible_by`` if given (the trainer validates with sliding windows).

    Training adds, when ``cfg.augmentation.enabled``, random flips along each spatial axis and random 90-degree
    rotations in the plane of the first two spatial axes. Ends with float32.

    Args:
        cfg: the validated ``data`` settings.
        spatial_dims: 2 or 3, ``len(cfg.voxel_size)``.
        train: training (random patches, augmentation) or validation transforms.
        divisible_by: validation volumes kept whole (:func:`validates_whole_volumes`) are padded to a multiple
            of this (e.g. the autoencoder's total downsampling factor per axis).
        whole_volume: validation only: skip the crop / resize step, so that volumes keep their size after
            orientation, spacing, voxel_resize and intensity scaling (stage 1 validates them by sliding windows).
    """
    from monai.transforms import (
        Compose,
        DivisiblePadd,
        EnsureChannelFirstd,
        EnsureTyped,
        Lambdad,
        LoadImaged,
        Orientationd,
        RandFlipd,
        RandRotate90d,
        RandSpatialCropd,
        Resized,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
        SpatialPadd,
    )

    if divisible_by is not None:
        k = [int(divisible_by)] * spatial_dims if isinstance(divisible_by, (int, np.integer)) else list(divisible_by)
        if len(k) != spatial_dims or min(k) < 1:
            raise DataError(f"divisible_by must be {spatial_dims} positive ints, got {divisible_by!r}")
        divisible_by = [int(v) for v in k]

    keys = ["image"]
    size = list(cfg.voxel_size)
    interpolation = "trilinear" if spatial_dims == 3 else "bilinear"
    aug = cfg.augmentation
    xforms: list = [
        LoadImaged(keys=keys, reader=_readers(), image_only=True, squeeze_non_spatial_dims=True),
        EnsureChannelFirstd(keys=keys),
    ]
    if spatial_dims == 2:
        xforms.append(_squeeze_trailing_singleton(spatial_dims))
    if cfg.orientation is not None:
        xforms.append(Orientationd(keys=keys, axcodes=cfg.orientation[:spatial_dims], labels=_RAS_LABELS))
    if cfg.spacing is not None:
        xforms.append(Spacingd(keys=keys, pixdim=list(cfg.spacing), mode="bilinear"))
    if cfg.voxel_resize is not None:
        xforms.append(Resized(keys=keys, spatial_size=list(cfg.voxel_resize), mode=interpolation,
                              align_corners=False, anti_aliasing=True))
    if cfg.synthetic.enabled:  # the built-in datasets are made in [0, 1] already
        pass
    elif cfg.intensity.range is not None:
        low, high = (float(v) for v in cfg.intensity.range)
        xforms.append(ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0,
                                           clip=bool(cfg.intensity.clip)))
    else:
        xforms.append(
            ScaleIntensityRangePercentilesd(
                keys=keys,
                lower=float(cfg.intensity.lower_percentile),
                upper=float(cfg.intensity.upper_percentile),
                b_min=0.0,
                b_max=1.0,
                clip=bool(cfg.intensity.clip),
                channel_wise=True,
            )
        )
    if aug.invert_intensity:
        xforms.append(Lambdad(keys=keys, func=_invert_intensity))

    centre = ResizeWithPadOrCropd(keys=keys, spatial_size=size, mode="constant", value=0.0)
    resize = Resized(keys=keys, spatial_size=size, mode=interpolation, align_corners=False, anti_aliasing=True)
    if whole_volume and not train:
        pass  # sliding-window validation: the whole volume, neither cropped nor resized
    elif train and uses_random_patches(cfg):
        xforms.append(SpatialPadd(keys=keys, spatial_size=size, mode="constant", value=0.0))
        xforms.append(RandSpatialCropd(keys=keys, roi_size=size, random_size=False, random_center=True))
    elif not train and aug.use_center_crop_for_val is not None:
        xforms.append(centre if aug.use_center_crop_for_val else resize)
    elif not train and uses_random_patches(cfg):  # whole volumes, validated with sliding windows
        if divisible_by is not None:
            xforms.append(DivisiblePadd(keys=keys, k=divisible_by, mode="constant", value=0.0))
    elif cfg.crop_mode == "resize" and cfg.voxel_resize is None:
        xforms.append(resize)
    else:  # pad_crop, or resize after voxel_resize: the centre
        xforms.append(centre)
    if train and aug.enabled and aug.random_flip_prob > 0:
        for axis in range(spatial_dims):
            xforms.append(RandFlipd(keys=keys, prob=float(aug.random_flip_prob), spatial_axis=axis))
    if train and aug.enabled and aug.random_rotate_prob > 0:
        xforms.append(RandRotate90d(keys=keys, prob=float(aug.random_rotate_prob), max_k=3, spatial_axes=(0, 1)))
    xforms.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return Compose(xforms)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def _transform_key(cfg: DataSettings, spatial_dims: int, train: bool, divisible_by, whole_volume: bool = False) -> str:
    """Identify the transform chain, so a PersistentDataset cache never serves stale results."""
    payload = {
        "version": _TRANSFORM_VERSION,
        "spatial_dims": spatial_dims,
        "train": train,
        "divisible_by": list(divisible_by) if divisible_by is not None and not isinstance(divisible_by, int) else divisible_by,
        "voxel_size": list(cfg.voxel_size),
        "spacing": None if cfg.spacing is None else list(cfg.spacing),
        "orientation": cfg.orientation,
        "intensity": None if cfg.synthetic.enabled else dataclasses.asdict(cfg.intensity),
        "crop_mode": cfg.crop_mode,
    }
    # options added later enter the key only when set, so that caches made before them stay valid
    if cfg.intensity.range is None and payload["intensity"] is not None:
        payload["intensity"].pop("range")
    extra = {
        "voxel_resize": None if cfg.voxel_resize is None else list(cfg.voxel_resize),
        "use_patch_based": cfg.augmentation.use_patch_based or None,
        "use_center_crop_for_val": cfg.augmentation.use_center_crop_for_val,
        "invert_intensity": cfg.augmentation.invert_intensity or None,
    }
    payload.update({k: v for k, v in extra.items() if v is not None})
    if whole_volume:
        payload["whole_volume"] = True
    digest = hashlib.md5(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"{'train' if train else 'val'}_{digest}"


def _item_hash(item) -> bytes:
    """Cache key of a datalist entry: its content plus the image file's size and modification time."""
    d = dict(item)
    path = d.get("image")
    stat = None
    if isinstance(path, str):
        try:
            st = os.stat(path)
            stat = [st.st_size, st.st_mtime_ns]
        except OSError:
            stat = None
    payload = json.dumps({"item": d, "stat": stat}, sort_keys=True, default=str)
    return hashlib.md5(payload.encode()).hexdigest().encode()


def _make_dataset(data: list[dict], transform, cfg: DataSettings, cache_subdir: str):
    from monai.data import CacheDataset, Dataset, PersistentDataset

    if cfg.cache_dir:
        cache = Path(cfg.cache_dir).expanduser() / cache_subdir
        cache.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(
            data=data,
            transform=transform,
            cache_dir=cache,
            hash_func=_item_hash,
            # plain tensors only, read back with weights_only=True: a cache file can hold no code (a file that is
            # not such a cache is deleted and recomputed, with MONAI's warning)
            track_meta=False,
            weights_only=True,
        )
    if cfg.cache_rate > 0:
        workers = cfg.num_workers if cfg.num_workers > 0 else min(8, os.cpu_count() or 1)
        return CacheDataset(
            data=data, transform=transform, cache_rate=float(cfg.cache_rate), num_workers=workers, progress=False
        )
    return Dataset(data=data, transform=transform)


def _spacing_from_affine(affine: np.ndarray, spatial_dims: int) -> list[float]:
    a = np.asarray(affine, dtype=np.float64)
    return [float(v) for v in np.sqrt((a[:spatial_dims, :spatial_dims] ** 2).sum(axis=0))]


def build_datasets(
    cfg: DataSettings,
    spatial_dims: int,
    in_channels: int,
    work_dir: str | os.PathLike | None = None,
    divisible_by: Sequence[int] | int | None = None,
    whole_val_volumes: bool = False,
):
    """Resolve the data source, check every file's header, and build the training/validation datasets.

    Source (exactly one): ``cfg.synthetic.enabled`` (phantoms written under ``work_dir/synthetic_data``,
    or ``cfg.cache_dir/synthetic_data`` without a work_dir), ``cfg.datalist`` (``"training"`` and optional
    ``"validation"`` lists), or ``cfg.train_data_dir`` (+ optional ``cfg.val_data_dir``). Without a
    validation source the last ~10% (at least 1) of the training files are held out, deterministically.

    ``cfg.max_data_size_for_train`` / ``cfg.max_data_size_for_val`` keep the first N entries of each list (sorted
    folder listing, datalist order, or the synthetic volumes in order): with an own validation source before the
    header checks (only those files are checked), otherwise after the hold-out.

    Datasets: ``PersistentDataset`` when ``cfg.cache_dir`` is set (one subfolder per transform chain),
    else ``CacheDataset`` when ``cfg.cache_rate > 0``, else ``Dataset``.

    Returns:
        ``(train_ds, val_ds, info)``; ``info`` holds ``source`` (``"synthetic"``, ``"datalist"`` or
        ``"folders"``), ``source_description``, ``n_train``, ``n_val``, ``train_files``, ``val_files``,
        ``val_split`` (a sentence if validation files were held out of the training files, else None),
        ``subset`` (a sentence if ``max_data_size_for_*`` left files out, else None; also logged),
        ``orientation`` (axis codes of ``affine``, e.g. ``"RAS"``; ``"RA"`` for 2D), ``input_spacing`` (``cfg.spacing`` if set, else the first training file's spacing
        after reorientation), ``spacing`` (voxel spacing of the volumes the network sees, from ``affine``;
        differs from ``input_spacing`` in ``resize`` mode), ``affine`` (float64 numpy array of the first
        training volume after the deterministic transforms; 4x4 also for 2D, as MONAI keeps the NIfTI affine; with
        random patches the center ``voxel_size`` patch), ``shape`` (its
        spatial shape), ``in_channels``, ``spatial_dims``, ``crop_mode``, ``voxel_size`` and
        ``val_whole_volumes`` (:func:`validates_whole_volumes`: validation items are whole volumes of
        varying size; load them with batch size 1).

    ``whole_val_volumes``: validation volumes are not cropped or resized to ``voxel_size`` (see
    :func:`build_transforms`), for sliding-window validation.
    """
    in_channels = int(in_channels)
    if cfg.synthetic.enabled:
        from .settings import synthetic_params

        base = Path(work_dir) if work_dir is not None else (Path(cfg.cache_dir) if cfg.cache_dir else None)
        if base is None:
            raise DataError("data.synthetic.enabled needs a place to write the volumes: pass work_dir or set "
                            "data.cache_dir")
        out_dir = base.expanduser() / "synthetic_data"
        syn = cfg.synthetic
        train_paths, val_paths = make_synthetic_dataset(
            out_dir, syn.num_train, syn.num_val, cfg.voxel_size, syn.seed, kind=syn.kind, params=synthetic_params(syn)
        )
        source = "synthetic"
        train_entries = [{"image": p} for p in train_paths]
        val_entries = [{"image": p} for p in val_paths]
        description = (
            f"built-in {syn.kind} volumes in {os.path.abspath(out_dir)!r} (seed={syn.seed}, {len(train_paths)} train, "
            f"{len(val_paths)} val, {'x'.join(map(str, cfg.voxel_size))} voxels)"
        )
    elif cfg.datalist:
        source = "datalist"
        train_entries = load_datalist(cfg.datalist, "training")
        val_entries = load_datalist(cfg.datalist, "validation", missing_ok=True)
        if not train_entries:
            raise DataError(f"datalist {cfg.datalist!r}: the 'training' list is empty")
        description = f"datalist {os.path.abspath(Path(cfg.datalist).expanduser())!r}"
    else:
        source = "folders"
        train_entries = [{"image": p} for p in discover_images(cfg.train_data_dir, spatial_dims)]
        val_entries = [{"image": p} for p in discover_images(cfg.val_data_dir, spatial_dims)] if cfg.val_data_dir else []
        description = f"folder {os.path.abspath(Path(cfg.train_data_dir).expanduser())!r}" + (
            f" (validation: {os.path.abspath(Path(cfg.val_data_dir).expanduser())!r})" if cfg.val_data_dir else ""
        )

    subset: list[str] = []
    if val_entries:  # an own validation source: only the first N of each list are checked and used
        train_entries = _first_files(train_entries, cfg.max_data_size_for_train, "training", subset)
        val_entries = _first_files(val_entries, cfg.max_data_size_for_val, "validation", subset)
    train_entries = check_files(train_entries, in_channels, spatial_dims, cfg.on_read_error)
    if val_entries:
        val_entries = check_files(val_entries, in_channels, spatial_dims, cfg.on_read_error)

    val_split = None
    if not val_entries:
        n = len(train_entries)
        if n == 1:
            warnings.warn(
                f"only one training file ({train_entries[0]['image']!r}) and no validation source: "
                "validating on the training file"
            )
            val_entries = list(train_entries)
            val_split = "no validation source and a single training file: validating on the training file"
        else:
            n_val = max(1, int(round(0.1 * n)))
            val_entries = train_entries[n - n_val :]
            train_entries = train_entries[: n - n_val]
            val_split = f"no validation source: the last {n_val} of {n} training files were held out for validation"
        # limits apply to the lists after the hold-out
        train_entries = _first_files(train_entries, cfg.max_data_size_for_train, "training", subset)
        val_entries = _first_files(val_entries, cfg.max_data_size_for_val, "validation", subset)
    subset_note = "; ".join(subset) if subset else None
    if subset_note:
        logger.info("data: %s", subset_note)

    train_tf = build_transforms(cfg, spatial_dims, train=True, divisible_by=divisible_by)
    val_tf = build_transforms(cfg, spatial_dims, train=False, divisible_by=divisible_by, whole_volume=whole_val_volumes)
    train_ds = _make_dataset(train_entries, train_tf, cfg, _transform_key(cfg, spatial_dims, True, divisible_by))
    val_ds = _make_dataset(val_entries, val_tf, cfg,
                           _transform_key(cfg, spatial_dims, False, divisible_by, whole_val_volumes))

    # Geometry of the output volumes: the first training file through the deterministic transforms.
    first = train_entries[0]["image"]
    reference = _reference_geometry(first, cfg, spatial_dims)
    input_spacing = list(cfg.spacing) if cfg.spacing is not None else reference["input_spacing"]

    info = {
        "source": source,
        "source_description": description,
        "n_train": len(train_entries),
        "n_val": len(val_entries),
        "train_files": [e["image"] for e in train_entries],
        "val_files": [e["image"] for e in val_entries],
        "val_split": val_split,
        "subset": subset_note,
        "orientation": reference["orientation"],
        "input_spacing": [float(s) for s in input_spacing],
        "spacing": reference["spacing"],
        "affine": reference["affine"],
        "shape": reference["shape"],
        "in_channels": in_channels,
        "spatial_dims": spatial_dims,
        "crop_mode": cfg.crop_mode,
        "voxel_size": list(cfg.voxel_size),
        "val_whole_volumes": validates_whole_volumes(cfg) or whole_val_volumes,
    }
    return train_ds, val_ds, info


def _first_files(entries: list[dict], limit: int | None, what: str, notes: list[str]) -> list[dict]:
    """The first ``limit`` entries (all when ``limit`` is None); appends a sentence to ``notes`` when some are
    left out."""
    if limit is None or len(entries) <= limit:
        return entries
    key = "max_data_size_for_train" if what == "training" else "max_data_size_for_val"
    notes.append(f"using the first {limit} of {len(entries)} {what} files (data.{key})")
    return entries[:limit]


def _reference_geometry(path: str, cfg: DataSettings, spatial_dims: int) -> dict:
    """Run one file through the deterministic transforms (one load): the spacing after reorientation (and
    resampling), and the affine/shape of the result. Random patches are treated as a center ``voxel_size``
    patch."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    ref_cfg = training_geometry(cfg)
    item: Any = {"image": path}
    input_spacing = None
    geometric = True  # load, channel first, (2D squeeze,) orientation, spacing: the input's own geometry
    for t in build_transforms(ref_cfg, spatial_dims, train=False).transforms:
        geometric = geometric and (isinstance(t, (LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd))
                                   or type(t).__name__ == "_SqueezeTrailingSpatiald")
        item = t(item)
        if geometric:
            input_spacing = _spacing_from_affine(np.asarray(item["image"].affine), spatial_dims)
    out = item["image"]
    affine = np.asarray(out.affine, dtype=np.float64)
    codes = nib.aff2axcodes(affine) if affine.shape == (4, 4) else (None,)
    return {
        "orientation": "".join(c if c is not None else "?" for c in codes)[:spatial_dims],
        "affine": affine,
        "spacing": _spacing_from_affine(affine, spatial_dims),
        "shape": [int(s) for s in out.shape[1:]],
        "input_spacing": input_spacing,
    }


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


def build_loaders(
    train_ds,
    val_ds,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    distributed: bool = False,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    val_batch_size: int | None = None,
):
    """MONAI ``DataLoader`` s for training (shuffled) and validation (in order).

    With ``distributed=True`` both use a ``DistributedSampler`` (``shuffle`` for training only, seeded with
    ``seed``; ``num_replicas``/``rank`` default to the process group's); call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch. Note that ``DistributedSampler`` pads the
    validation set by repeating items so every rank gets the same count.

    Args:
        train_ds, val_ds: datasets from :func:`build_datasets`.
        batch_size: training batch size (per process).
        num_workers: loader worker processes.
        pin_memory: pin host memory (ignored when no CUDA device is available).
        distributed: use ``DistributedSampler``.
        seed: shuffling seed.
        num_replicas, rank: passed to ``DistributedSampler``.
        val_batch_size: validation batch size (default ``batch_size``; use 1 for whole volumes of varying
            size, ``info["val_whole_volumes"]``).
    """
    from monai.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size!r}")
    val_batch_size = int(batch_size if val_batch_size is None else val_batch_size)
    if val_batch_size < 1:
        raise DataError(f"val_batch_size must be >= 1, got {val_batch_size!r}")
    # workers are started anew each epoch (not persistent) so that their random state follows the per-epoch seed:
    # that is what makes a resumed run repeat the uninterrupted one exactly, also with num_workers > 0
    common = {
        "num_workers": int(num_workers),
        "pin_memory": bool(pin_memory) and torch.cuda.is_available(),  # no-op (and a warning) without a GPU
    }
    if distributed:
        train_sampler = DistributedSampler(train_ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        val_sampler = DistributedSampler(val_ds, num_replicas=num_replicas, rank=rank, shuffle=False)
        train_loader = DataLoader(train_ds, batch_size=int(batch_size), sampler=train_sampler, **common)
        val_loader = DataLoader(val_ds, batch_size=val_batch_size, sampler=val_sampler, **common)
    else:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
        train_loader = DataLoader(train_ds, batch_size=int(batch_size), shuffle=True, generator=generator, **common)
        val_loader = DataLoader(val_ds, batch_size=val_batch_size, shuffle=False, **common)
    return train_loader, val_loader
