"""Loading the volumes of a folder for evaluation (``evaluate --real DIR --samples DIR``): NIfTI, 2D images or
``.npy`` arrays, as stored, into one ``(N, C, *spatial)`` tensor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import EvaluateError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy",)


def _suffix(name: str) -> str:
    low = name.lower()
    for suffix in NIFTI_SUFFIXES[::-1] + IMAGE_SUFFIXES + ARRAY_SUFFIXES:
        if low.endswith(suffix):
            return suffix
    return ""


def _load_nifti(path: Path) -> tuple[np.ndarray, list[float]]:
    import nibabel as nib

    img = nib.load(str(path))
    array = np.asarray(img.dataobj, dtype=np.float32)
    zooms = [float(z) for z in img.header.get_zooms()]
    if array.ndim == 3 and array.shape[2] == 1:  # a 2D image stored as (X, Y, 1)
        array = array[:, :, 0]
    if array.ndim == 2:
        return array[None], zooms[:2]
    if array.ndim == 3:
        return array[None], zooms[:3]
    if array.ndim == 4:  # channels last, as NIfTI stores them
        return np.moveaxis(array, -1, 0), zooms[:3]
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector intent layout (X, Y, Z, 1, C)
        return np.moveaxis(array[:, :, :, 0], -1, 0), zooms[:3]
    raise EvaluateError(f"{path}: a NIfTI array of shape {tuple(array.shape)} is neither 2D nor 3D (+ channels)")


def _load_image(path: Path) -> tuple[np.ndarray, list[float]]:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "P", "CMYK", "YCbCr"):
            img = img.convert("RGB" if img.mode != "LA" else "L")
        array = np.asarray(img)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16 or (array.dtype.kind in "iu" and array.max() > 255):
        array = array.astype(np.float32) / 65535.0
    elif array.dtype == bool:
        array = array.astype(np.float32)
    else:
        array = array.astype(np.float32)
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    # PIL gives (rows, columns); the project's 2D tensors are (X, Y) like a 2D NIfTI, i.e. columns first
    return np.ascontiguousarray(np.swapaxes(array, 1, 2)), [1.0, 1.0]


def _load_npy(path: Path) -> tuple[np.ndarray, list[float]]:
    array = np.load(path).astype(np.float32)
    if array.ndim in (2, 3):
        return array[None], [1.0] * array.ndim
    if array.ndim == 4:  # channels last, as generate.py writes multi-channel samples
        return np.moveaxis(array, -1, 0), [1.0] * 3
    raise EvaluateError(f"{path}: an array of shape {tuple(array.shape)} is neither 2D nor 3D (+ channels last)")


def load_volume_folder(folder: str | os.PathLike, *, what: str = "real") -> tuple[torch.Tensor, dict[str, Any]]:
    """Load every volume directly inside ``folder`` (sorted by name) into one tensor.

    NIfTI files (``.nii``, ``.nii.gz``; 3D, 3D + channels, or 2D) are read as stored, without reorientation. When
    a folder holds no NIfTI file, 2D images (``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``; 8-bit scaled by
    1/255, 16-bit by 1/65535) are read, else ``.npy`` arrays. A folder of NIfTI samples written by
    ``generate_samples`` also holds PNG previews; those are then ignored (listed under ``"ignored"``). Hidden files
    are skipped.

    Args:
        folder: the folder to read (not recursive).
        what: what the folder holds, for error messages ("real", "samples", "reconstructions").

    Returns:
        ``(volumes, meta)``: volumes of shape ``(N, C, *spatial)``, float32; meta holds ``folder``, ``files``
        (names), ``count``, ``shape`` (``[C, *spatial]``), ``spacing`` (of the first file) and ``ignored``.

    Raises:
        EvaluateError: the folder is missing, is not a folder, holds no readable volume, or its files differ in shape.
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise EvaluateError(f"{what} folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise EvaluateError(f"{what} folder {str(path)!r} is not a folder")
    entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    by_kind: dict[str, list[Path]] = {"nifti": [], "image": [], "array": []}
    for p in entries:
        suffix = _suffix(p.name)
        if suffix in NIFTI_SUFFIXES:
            by_kind["nifti"].append(p)
        elif suffix in IMAGE_SUFFIXES:
            by_kind["image"].append(p)
        elif suffix in ARRAY_SUFFIXES:
            by_kind["array"].append(p)
    kind = next((k for k in ("nifti", "image", "array") if by_kind[k]), None)
    if kind is None:
        raise EvaluateError(
            f"{what} folder {str(path)!r} holds 0 volumes ({len(entries)} file(s), none of them "
            f"{', '.join(NIFTI_SUFFIXES + IMAGE_SUFFIXES + ARRAY_SUFFIXES)})"
        )
    files = by_kind[kind]
    ignored = [p.name for k, ps in by_kind.items() if k != kind for p in ps]
    loader = {"nifti": _load_nifti, "image": _load_image, "array": _load_npy}[kind]
    arrays, spacing, shapes = [], None, {}
    for p in tqdm(files, desc=f"loading {what}", leave=False, disable=len(files) < 20):
        try:
            array, zooms = loader(p)
        except EvaluateError:
            raise
        except Exception as exc:  # unreadable file: say which one
            raise EvaluateError(f"{what} folder {str(path)!r}: cannot read {p.name}: {exc}") from exc
        arrays.append(array)
        shapes.setdefault(tuple(array.shape), []).append(p.name)
        spacing = spacing or zooms
    if len(shapes) > 1:
        summary = "; ".join(
            f"{len(names)} of shape (C, *spatial) {list(shape)} (e.g. {names[0]})" for shape, names in shapes.items()
        )
        raise EvaluateError(
            f"{what} folder {str(path)!r}: its {len(files)} volumes differ in shape: {summary}; "
            "all volumes compared must have one shape"
        )
    volumes = torch.from_numpy(np.stack(arrays)).float()
    meta = {
        "folder": str(path),
        "files": [p.name for p in files],
        "count": len(files),
        "shape": list(volumes.shape[1:]),
        "spacing": spacing,
        "ignored": ignored,
    }
    return volumes, meta
