"""Reconstruction and generation metrics, folder loading, reports and picture grids.

Everything here works on float32 tensors of shape ``(N, C, *spatial)`` with two or three spatial dimensions; the
real data is expected roughly in ``[0, 1]``. The metrics are defined in ``docs/evaluate.md``; in short:

- :func:`reconstruction_metrics`: PSNR, SSIM, MS-SSIM and L1 of paired volumes (MONAI ``PSNRMetric``,
  ``SSIMMetric``, ``MultiScaleSSIMMetric``).
- :func:`generation_metrics`: how close a set of generated volumes is to a reference set, without downloaded
  weights: ``mmd``, ``ms_ssim_diversity`` / ``ms_ssim_diversity_real``, ``histogram_w1``, ``nn_ratio``,
  ``c2st_accuracy``, and ``fid`` when a local feature-extractor file is given.
- :func:`compare_sets`: samples vs real, and with reconstructions also samples vs reconstructions and
  reconstructions vs real, plus counts, shapes, value ranges and settings.
- :func:`write_report`: JSON + Markdown + PNG grid, atomically, never replacing an existing report unasked.
- :func:`projection_consistency`: how well samples of a projection-conditioned model match their conditions
  (Pearson correlation of each sample's projection with its condition).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import EvaluateError
from .fileio import atomic_write_bytes, plain

__all__ = [
    "EvaluateError",
    "C2STSettings",
    "load_volume_folder",
    "reconstruction_metrics",
    "ms_ssim_settings",
    "mmd",
    "unbiased_mmd",
    "ms_ssim_diversity",
    "histogram_w1",
    "nn_ratio",
    "c2st_accuracy",
    "c2st_min_count",
    "load_feature_extractor",
    "fid",
    "generation_metrics",
    "projection_consistency",
    "compare_sets",
    "summary_table",
    "picture_grid",
    "write_report",
]

REPORT_VERSION = 1
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy",)
MMD_SIZE = {2: 64, 3: 32}  # largest side of the volumes MMD is computed on
C2ST_SIZE = {2: 64, 3: 32}  # largest side of the volumes the C2ST classifier sees
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default
MAX_PAIRS = 1000  # diversity: all pairs up to this many, else a seeded random subset




# ----------------------------------------------------------------------------------------------
# Loading folders
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _check_volumes(x: torch.Tensor, name: str, min_count: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise EvaluateError(f"{name} must be a torch.Tensor of shape (N, C, *spatial), got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise EvaluateError(
            f"{name} must have shape (N, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(x.shape)}"
        )
    if x.shape[0] < min_count:
        raise EvaluateError(f"{name} holds {x.shape[0]} volume(s); at least {min_count} are needed")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise EvaluateError(f"{name} holds {bad} non-finite value(s) (NaN or inf)")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise EvaluateError(
            f"{name_a} ({a.shape[0]} volumes of shape (C, *spatial) {list(a.shape[1:])}) and {name_b} "
            f"({b.shape[0]} volumes of shape {list(b.shape[1:])}) differ in shape; they must match to be compared"
        )


def _downsample(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """Area-average ``x`` so that its largest spatial side is at most ``max_side`` (aspect ratio kept)."""
    spatial = x.shape[2:]
    scale = max_side / max(spatial)
    if scale >= 1.0:
        return x.float()
    size = [max(1, round(s * scale)) for s in spatial]
    return F.interpolate(x.float(), size=size, mode="area")


def _pairs(n: int, max_pairs: int, seed: int) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    return pairs


def _round(value: float, digits: int = 6) -> float:
    return float(f"{float(value):.{digits}g}")


# ----------------------------------------------------------------------------------------------
# Reconstruction metrics
# ----------------------------------------------------------------------------------------------


def _largest_odd(limit: int, cap: int = 11) -> int:
    k = min(cap, limit)
    return k if k % 2 else k - 1


def ms_ssim_settings(spatial_shape: Sequence[int]) -> dict[str, Any]:
    """Kernel sizes, sigmas and scale weights that make MONAI's MS-SSIM valid for ``spatial_shape``.

    MONAI's defaults (5 scales, an 11-voxel Gaussian, sigma 1.5) need sides of at least 176 voxels. For smaller
    volumes the number of scales ``L`` is the largest of 5..1 for which a kernel of at least 3 voxels fits both
    MONAI's own check (``side // (L-1)**2 > k-1``) and the coarsest scale (``side // 2**(L-1) >= k``); each side's
    kernel is then the largest odd size up to 11 that fits, with sigma ``1.5 * k / 11``; the first ``L`` default
    weights are kept and renormalised to sum 1. With ``L = 1`` MS-SSIM equals SSIM.

    Args:
        spatial_shape: the volumes' spatial shape.

    Returns:
        ``{"kernel_size": [...], "kernel_sigma": [...], "weights": [...], "scales": L}``.
    """
    sides = [int(s) for s in spatial_shape]
    if min(sides) < 3:
        raise EvaluateError(f"MS-SSIM needs every spatial side to be at least 3 voxels, got shape {sides}")
    for scales in range(5, 0, -1):
        div = max(1, scales - 1) ** 2
        # MONAI checks side // div > k - 1, and the coarsest scale must hold the kernel: side // 2**(L-1) >= k
        kernel = [_largest_odd(min(s // div, s // 2 ** (scales - 1))) for s in sides]
        if min(kernel) >= 3:
            weights = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
            weights = (weights / weights.sum()).tolist()
            return {
                "kernel_size": kernel,
                "kernel_sigma": [_round(1.5 * k / 11.0, 4) for k in kernel],
                "weights": [_round(w, 6) for w in weights],
                "scales": scales,
            }
    raise EvaluateError(f"no valid MS-SSIM kernel for spatial shape {sides}")  # pragma: no cover (min side >= 3)


def _ms_ssim_metric(spatial_shape: Sequence[int], data_range: float):
    from monai.metrics import MultiScaleSSIMMetric

    s = ms_ssim_settings(spatial_shape)
    return MultiScaleSSIMMetric(
        spatial_dims=len(spatial_shape),
        data_range=data_range,
        kernel_size=s["kernel_size"],
        kernel_sigma=s["kernel_sigma"],
        weights=s["weights"],
        reduction="none",
    )


def _ssim_metric(spatial_shape: Sequence[int], data_range: float):
    from monai.metrics import SSIMMetric

    kernel = [_largest_odd(int(s)) for s in spatial_shape]
    if min(kernel) < 3:
        raise EvaluateError(f"SSIM needs every spatial side to be at least 3 voxels, got shape {list(spatial_shape)}")
    return SSIMMetric(
        spatial_dims=len(spatial_shape),
        data_range=data_range,
        win_size=kernel,
        kernel_sigma=[1.5 * k / 11.0 for k in kernel],
        reduction="none",
    )


def _per_volume(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.reshape(values.shape[0], -1).mean(dim=1)]


def reconstruction_metrics(
    real: torch.Tensor, recon: torch.Tensor, data_range: float = 1.0, batch_size: int = 4
) -> dict[str, Any]:
    """PSNR, SSIM, MS-SSIM and L1 of paired volumes, per volume and as a mean.

    Args:
        real: reference volumes, ``(N, C, *spatial)``.
        recon: their reconstructions, same shape.
        data_range: the intensity range used by PSNR and (MS-)SSIM (1.0 for data in [0, 1]).
        batch_size: volumes per metric call.

    Returns:
        ``{"psnr": mean, "ssim": mean, "ms_ssim": mean, "l1": mean, "per_volume": {name: [...]},
        "count": N, "data_range": ..., "ms_ssim_settings": {...}}``. PSNR of identical volumes is ``inf``
        (written as ``null`` in JSON).
    """
    from monai.metrics import PSNRMetric

    _check_volumes(real, "real")
    _check_volumes(recon, "recon")
    if real.shape != recon.shape:
        raise EvaluateError(
            f"real volumes {list(real.shape)} and reconstructions {list(recon.shape)} must have the same shape "
            "(N, C, *spatial) to be compared pairwise"
        )
    if not data_range > 0:
        raise EvaluateError(f"data_range must be > 0, got {data_range}")
    spatial = real.shape[2:]
    psnr_m = PSNRMetric(max_val=data_range, reduction="none")
    ssim_m = _ssim_metric(spatial, data_range)
    ms_m = _ms_ssim_metric(spatial, data_range)
    out: dict[str, list[float]] = {"psnr": [], "ssim": [], "ms_ssim": [], "l1": []}
    starts = range(0, real.shape[0], batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc="reconstruction metrics", leave=False, disable=len(starts) < 4):
            y, y_pred = real[i : i + batch_size].float(), recon[i : i + batch_size].float()
            out["psnr"] += _per_volume(psnr_m(y_pred, y))
            out["ssim"] += _per_volume(ssim_m(y_pred, y))
            out["ms_ssim"] += _per_volume(ms_m(y_pred, y))
            out["l1"] += _per_volume((y_pred - y).abs())
    result: dict[str, Any] = {name: float(np.mean(values)) for name, values in out.items()}
    result.update(
        per_volume=out,
        count=int(real.shape[0]),
        data_range=float(data_range),
        ms_ssim_settings=ms_ssim_settings(spatial),
    )
    return result


# ----------------------------------------------------------------------------------------------
# Generation metrics
# ----------------------------------------------------------------------------------------------


def _mmd_features(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """Intensity and local high-frequency amplitude, area-downsampled; channels concatenated."""
    from monai.networks.layers import GaussianFilter

    x = x.float()
    blur = GaussianFilter(spatial_dims=x.ndim - 2, sigma=1.0)(x)
    detail = (x - blur).square()
    return torch.cat([_downsample(x, max_side), _downsample(detail, max_side).sqrt()], dim=1)


def mmd(real: torch.Tensor, samples: torch.Tensor, max_side: int | None = None) -> float:
    """MMD (MONAI ``MMDMetric``'s unbiased linear-kernel estimator, :func:`unbiased_mmd`, so that the set sizes may
    differ) between standardised features of the two sets, per feature.

    Each volume is mapped to two channels: its intensities and its local high-frequency amplitude
    (``sqrt(area_downsample((x - gauss_sigma1(x))**2))``, which blur lowers and noise raises), both
    area-downsampled so that the largest side is at most ``max_side`` (32 for 3D, 64 for 2D). Each feature
    channel is standardised with the mean and standard deviation of that channel over both sets together (all
    volumes and voxels), so the value is symmetric and comparable between comparisons. The MMD of these features
    is divided by their number: a mean squared difference of the two sets' mean features in units of their pooled
    standard deviation, 0 in expectation for two draws from one distribution (the unbiased estimate can be
    slightly negative) and at most about 4.

    Args:
        real: reference volumes, at least 2.
        samples: generated volumes, at least 2, same shape.
        max_side: largest side after downsampling (default by dimensionality).
    """
    _check_volumes(real, "real", 2)
    _check_volumes(samples, "samples", 2)
    _check_same_shape(real, samples, "real", "samples")
    side = max_side or MMD_SIZE[real.ndim - 2]
    with torch.no_grad():
        fr, fs = _mmd_features(real, side).double(), _mmd_features(samples, side).double()
        both, dims = torch.cat([fr, fs]), [0] + list(range(2, fr.ndim))
        mean, std = both.mean(dim=dims, keepdim=True), both.std(dim=dims, keepdim=True).clamp_min(1e-8)
        value = unbiased_mmd((fr - mean) / std, (fs - mean) / std)
    return float(value) / fr[0].numel()


def unbiased_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with a linear kernel between two sets of any sizes m, n >= 2 (items flattened):
    ``sum_{i!=j} <x_i, x_j> / (m (m-1)) + sum_{i!=j} <y_i, y_j> / (n (n-1)) - 2 sum_{i,j} <x_i, y_j> / (m n)``.

    The estimator of MONAI's ``MMDMetric`` (equal to it when m == n, which a test checks); MONAI's requires two
    sets of the same size, and evaluating N samples against a different number of real volumes must work.

    Args:
        x: first set, shape (m, ...).
        y: second set, shape (n, ...), the same item shape.
    """
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must hold at least 2 items of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    m, n = x.shape[0], y.shape[0]
    xx, yy = x @ x.T, y @ y.T
    within_x = (xx.sum() - xx.diagonal().sum()) / (m * (m - 1))
    within_y = (yy.sum() - yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * (x @ y.T).sum() / (m * n)


def ms_ssim_diversity(volumes: torch.Tensor, data_range: float = 1.0, seed: int = 0, max_pairs: int = MAX_PAIRS) -> float:
    """Mean MS-SSIM over pairs of distinct volumes of one set (lower = more diverse).

    This is the diversity measure of MONAI's brain LDM tutorial. All ``N (N-1) / 2`` pairs are used up to
    ``max_pairs``, beyond that a random subset drawn with ``seed``. Kernel sizes as in :func:`ms_ssim_settings`.

    Args:
        volumes: ``(N, C, *spatial)``, at least 2.
        data_range: intensity range for MS-SSIM (the real data's range).
        seed: seeds the choice of pairs when there are more than ``max_pairs``.
        max_pairs: most pairs evaluated.
    """
    _check_volumes(volumes, "volumes", 2)
    metric = _ms_ssim_metric(volumes.shape[2:], data_range)
    pairs = _pairs(volumes.shape[0], max_pairs, seed)
    values: list[float] = []
    chunk = max(1, min(64, (1 << 24) // volumes[0].numel()))  # about 64 MiB per side of a chunk
    with torch.no_grad():
        for k in tqdm(range(0, len(pairs), chunk), desc="ms-ssim diversity", leave=False, disable=len(pairs) < 256):
            block = pairs[k : k + chunk]
            a = volumes[[i for i, _ in block]].float()
            b = volumes[[j for _, j in block]].float()
            values += _per_volume(metric(a, b))
    return float(np.mean(values))


def histogram_w1(real: torch.Tensor, samples: torch.Tensor, quantiles: int = 4096) -> float:
    """Wasserstein-1 distance between the voxel intensity distributions, divided by the real data's range.

    Computed from the quantile functions, ``W1 = mean_q |Q_samples(q) - Q_real(q)|`` at ``quantiles`` mid-points
    ``q = (k + 0.5) / quantiles``, over all voxels and channels of each set; exact for a constant shift.

    Args:
        real: reference volumes.
        samples: generated volumes (any count; same number of channels is not required).
        quantiles: number of quantile levels.
    """
    _check_volumes(real, "real")
    _check_volumes(samples, "samples")
    a = np.sort(real.detach().float().cpu().numpy().ravel())
    b = np.sort(samples.detach().float().cpu().numpy().ravel())
    span = float(a[-1] - a[0])
    if span <= 0:
        raise EvaluateError(f"the real volumes are constant ({a[0]}); histogram_w1 needs a data range > 0")
    q = (np.arange(quantiles) + 0.5) / quantiles
    qa = a[np.minimum((q * a.size).astype(np.int64), a.size - 1)].astype(np.float64)
    qb = b[np.minimum((q * b.size).astype(np.int64), b.size - 1)].astype(np.float64)
    return float(np.abs(qa - qb).mean() / span)


def _rms_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """(len(a), len(b)) root-mean-square voxel differences."""
    fa = a.reshape(a.shape[0], -1).float()
    fb = b.reshape(b.shape[0], -1).float()
    rows = [torch.cdist(fa[i : i + chunk], fb, compute_mode="donot_use_mm_for_euclid_dist") for i in range(0, fa.shape[0], chunk)]
    return torch.cat(rows) / math.sqrt(fa.shape[1])


def nn_ratio(real: torch.Tensor, samples: torch.Tensor) -> dict[str, Any]:
    """Memorisation check: nearest-real distance of each sample over the typical real nearest-neighbour distance.

    Distances are root-mean-square voxel differences at full resolution. For each sample ``d(s)`` is its distance to
    the nearest real volume; the typical real distance ``d_real`` is the median over real volumes of the distance to
    their nearest *other* real volume. ``nn_ratio = d(s) / d_real``: 0 for a copy of a training volume, about 1
    when samples are as far from the training set as training volumes are from each other.

    Args:
        real: the training (or reference) volumes, at least 2.
        samples: generated volumes, same shape.

    Returns:
        ``{"mean", "min", "per_sample", "real_nn_distance", "nearest_real"}``.
    """
    _check_volumes(real, "real", 2)
    _check_volumes(samples, "samples")
    _check_same_shape(real, samples, "real", "samples")
    with torch.no_grad():
        rr = _rms_distances(real, real)
        rr.fill_diagonal_(float("inf"))
        typical = float(rr.min(dim=1).values.median())
        sr = _rms_distances(samples, real)
        nearest = sr.min(dim=1)
    if typical <= 0:
        raise EvaluateError("the real set holds identical volumes only; nn_ratio needs distinct real volumes")
    ratios = (nearest.values / typical).tolist()
    return {
        "mean": float(np.mean(ratios)),
        "min": float(np.min(ratios)),
        "per_sample": [_round(r) for r in ratios],
        "real_nn_distance": typical,
        "nearest_real": [int(i) for i in nearest.indices],
    }


@dataclass(frozen=True)
class C2STSettings:
    """Settings of the classifier two-sample test.

    Args:
        epochs: training epochs of the classifier (0 skips the test).
        test_fraction: fraction of each class held out for testing.
        min_train: fewest training volumes per class.
        min_test: fewest test volumes per class.
        max_side: the volumes are area-downsampled to at most this largest side (default 32 in 3D, 64 in 2D).
        channels: output channels of the classifier's convolution blocks.
        batch_size: training batch size.
        lr: Adam learning rate.
    """

    epochs: int = 30
    test_fraction: float = 0.5
    min_train: int = 4
    min_test: int = 4
    max_side: int | None = None
    channels: tuple[int, ...] = (8, 16, 32)
    batch_size: int = 8
    lr: float = 3e-3

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            raise EvaluateError(f"c2st epochs must be an integer >= 0, got {self.epochs!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise EvaluateError(f"c2st test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.min_train < 1 or self.min_test < 1:
            raise EvaluateError(f"c2st min_train and min_test must be >= 1, got {self.min_train}, {self.min_test}")
        if self.batch_size < 1 or not self.lr > 0:
            raise EvaluateError(f"c2st batch_size must be >= 1 and lr > 0, got {self.batch_size}, {self.lr}")


def _split_sizes(n: int, cfg: C2STSettings) -> tuple[int, int]:
    n_test = int(math.floor(n * cfg.test_fraction))
    return n - n_test, n_test


def c2st_min_count(cfg: C2STSettings | None = None) -> int:
    """The fewest volumes each set needs for the C2ST split."""
    cfg = cfg or C2STSettings()
    n = 2
    while True:
        n_train, n_test = _split_sizes(n, cfg)
        if n_train >= cfg.min_train and n_test >= cfg.min_test:
            return n
        n += 1


def _check_c2st_counts(n_real: int, n_samples: int, cfg: C2STSettings, names: Mapping[str, str]) -> None:
    need = c2st_min_count(cfg)
    if min(n_real, n_samples) < need:
        raise EvaluateError(
            f"the classifier two-sample test needs at least {need} volumes in each set ({cfg.min_train} to train and "
            f"{cfg.min_test} to test per set, test fraction {cfg.test_fraction}), got {n_real} in "
            f"{names.get('real', 'real')} and {n_samples} in {names.get('samples', 'samples')}"
        )


class _C2STNet(torch.nn.Module):
    """MONAI convolution blocks (3x3, ReLU, no normalisation), global average and max pooling, one logit."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        layers, prev = [], in_channels
        for i, ch in enumerate(channels):
            layers.append(
                Convolution(spatial_dims, prev, ch, strides=1 if i == 0 else 2, kernel_size=3, act="relu", norm=None)
            )
            prev = ch
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(2 * prev, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(2)
        return self.head(torch.cat([f.mean(dim=2), f.amax(dim=2)], dim=1)).reshape(-1)


def c2st_accuracy(
    real: torch.Tensor,
    samples: torch.Tensor,
    seed: int = 0,
    settings: C2STSettings | None = None,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Classifier two-sample test: held-out accuracy of a small CNN trained to tell real from generated.

    Both sets are cut to the same size ``n = min(N_real, N_samples)`` (a seeded random choice), area-downsampled
    (``settings.max_side``), and each split into ``n_train`` training and ``n_test = floor(n * test_fraction)``
    test volumes. A small CNN (MONAI ``Convolution`` blocks: 3x3 kernels, stride 1 then 2, ReLU, no
    normalisation; global average and max pooling; one linear logit) is trained
    with Adam and binary cross-entropy for ``settings.epochs`` epochs; the accuracy on the ``2 * n_test`` held-out
    volumes is reported. 0.5 means indistinguishable, 1.0 trivially separable. Deterministic for a given seed.

    Args:
        real: reference volumes.
        samples: generated volumes, same shape.
        seed: seeds the choice, the split, the initialisation and the batch order.
        settings: the test's settings.
        names: labels of the two sets (``{"real": ..., "samples": ...}``) for error messages.

    Returns:
        ``{"accuracy", "train_per_set", "test_per_set", "epochs", "seed", "input_shape", "train_accuracy",
        "final_loss"}``.
    """
    cfg = settings or C2STSettings()
    names = names or {}
    _check_volumes(real, "real")
    _check_volumes(samples, "samples")
    _check_same_shape(real, samples, names.get("real", "real"), names.get("samples", "samples"))
    _check_c2st_counts(real.shape[0], samples.shape[0], cfg, names)
    n = min(real.shape[0], samples.shape[0])
    n_train, n_test = _split_sizes(n, cfg)
    rng = np.random.default_rng(seed)
    side = cfg.max_side or C2ST_SIZE[real.ndim - 2]
    with torch.no_grad():
        xr = _downsample(real[torch.from_numpy(rng.permutation(real.shape[0])[:n])], side)
        xs = _downsample(samples[torch.from_numpy(rng.permutation(samples.shape[0])[:n])], side)
    x_train = torch.cat([xr[:n_train], xs[:n_train]])
    y_train = torch.cat([torch.zeros(n_train), torch.ones(n_train)])
    x_test = torch.cat([xr[n_train:], xs[n_train:]])
    y_test = torch.cat([torch.zeros(n_test), torch.ones(n_test)])

    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)  # standardised with the training split's statistics
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch_rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _C2STNet(x_train.ndim - 2, x_train.shape[1], cfg.channels)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loss_value = float("nan")
    net.train()
    for _ in tqdm(range(cfg.epochs), desc="c2st classifier", leave=False):
        order = torch.randperm(x_train.shape[0], generator=torch_rng)
        for k in range(0, len(order), cfg.batch_size):
            idx = order[k : k + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
    net.eval()
    with torch.no_grad():
        train_acc = float(((net(x_train) > 0).float() == y_train).float().mean())
        test_acc = float(((net(x_test) > 0).float() == y_test).float().mean())
    return {
        "accuracy": test_acc,
        "train_per_set": n_train,
        "test_per_set": n_test,
        "epochs": cfg.epochs,
        "seed": seed,
        "input_shape": list(x_train.shape[1:]),
        "train_accuracy": train_acc,
        "final_loss": _round(loss_value),
    }


# ----------------------------------------------------------------------------------------------
# FID (optional, local weights only)
# ----------------------------------------------------------------------------------------------


def _resnet_from_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """A MONAI ``ResNet`` feature extractor whose architecture is read from a (MedicalNet-style) state dict."""
    from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck

    state = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in state.items()}
    if "conv1.weight" not in state:
        raise EvaluateError(
            f"FID weights {str(path)!r}: a state dict without 'conv1.weight' is not a ResNet; expected a TorchScript "
            "feature extractor or a MONAI/MedicalNet ResNet state dict"
        )
    conv1 = state["conv1.weight"]
    spatial_dims = conv1.ndim - 2
    layers = []
    for i in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")}
        layers.append(len(blocks))
    bottleneck = "layer1.0.conv3.weight" in state
    block = ResNetBottleneck if bottleneck else ResNetBlock
    inplanes = [int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)]
    shortcut = "B" if any(k.startswith("layer2.0.downsample.") for k in state) else "A"
    net = ResNet(
        block=block,
        layers=layers,
        block_inplanes=inplanes,
        spatial_dims=spatial_dims,
        n_input_channels=int(conv1.shape[1]),
        conv1_t_size=tuple(int(s) for s in conv1.shape[2:]),
        conv1_t_stride=2,
        shortcut_type=shortcut,
        feed_forward=False,
        bias_downsample="layer2.0.downsample.0.bias" in state,
    )
    missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    if missing:
        raise EvaluateError(f"FID weights {str(path)!r}: {len(missing)} ResNet weight(s) missing, e.g. {missing[:3]}")
    net.fid_normalize = True  # MedicalNet convention: z-score each volume
    return net


def load_feature_extractor(path: str | os.PathLike) -> torch.nn.Module:
    """Load the feature extractor for FID from a local file; nothing is ever downloaded.

    Two kinds of file are accepted:

    - a TorchScript module (``torch.jit.save``) that maps ``(N, C, *spatial)`` volumes, as they are, to features
      ``(N, F)`` or ``(N, F, *spatial)`` (then averaged over space);
    - a ``torch.save``-d state dict of a MONAI / MedicalNet ``ResNet`` (keys ``conv1.weight``, ``layer1.0...``;
      a ``"state_dict"`` entry and ``module.`` prefixes are accepted), e.g. MedicalNet's ``resnet_10_23dataset.pth``
      for 3D. The depth, block type, shortcut type and input channels are read from the keys; volumes are z-scored
      per volume before the network, and the last feature map is averaged over space.

    Args:
        path: the weights file.

    Raises:
        EvaluateError: the file is missing or is neither kind.
    """
    import importlib.util

    file = Path(path).expanduser()
    if importlib.util.find_spec("scipy") is None:
        raise EvaluateError("FID needs scipy (MONAI's FIDMetric uses scipy.linalg.sqrtm): pip install scipy")
    if not file.is_file():
        raise EvaluateError(
            f"FID feature-extractor weights {str(file)!r} not found; FID needs a local file (a TorchScript feature "
            "extractor or a MedicalNet/MONAI ResNet state dict, see docs/evaluate.md); nothing is downloaded"
        )
    try:
        net = torch.jit.load(str(file), map_location="cpu")
        net.fid_normalize = False
        return net.eval()
    except Exception:  # not TorchScript: try a state dict
        pass
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EvaluateError(
            f"FID weights {str(file)!r} are neither a TorchScript module nor a torch state dict: {exc}"
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise EvaluateError(f"FID weights {str(file)!r} hold a {type(state).__name__}, not a state dict")
    return _resnet_from_state_dict(state, file).eval()


def _features(net: torch.nn.Module, x: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    feats = []
    normalize = bool(getattr(net, "fid_normalize", False))
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].float()
            if normalize:
                dims = tuple(range(1, xb.ndim))
                xb = (xb - xb.mean(dim=dims, keepdim=True)) / xb.std(dim=dims, keepdim=True).clamp_min(1e-6)
            f = net(xb)
            if isinstance(f, (tuple, list)):
                f = f[-1]
            feats.append(f.reshape(f.shape[0], f.shape[1], -1).mean(dim=2) if f.ndim > 2 else f)
    return torch.cat(feats)


def fid(real: torch.Tensor, samples: torch.Tensor, extractor: torch.nn.Module) -> float:
    """MONAI ``FIDMetric`` on the features of ``extractor`` (see :func:`load_feature_extractor`).

    Args:
        real: reference volumes, at least 2.
        samples: generated volumes, at least 2.
        extractor: the feature network.
    """
    from monai.metrics import FIDMetric

    _check_volumes(real, "real", 2)
    _check_volumes(samples, "samples", 2)
    try:
        fr, fs = _features(extractor, real), _features(extractor, samples)
    except RuntimeError as exc:
        raise EvaluateError(f"the FID feature extractor cannot process volumes of shape {list(real.shape[1:])}: {exc}") from exc
    return float(FIDMetric()(fs, fr))


# ----------------------------------------------------------------------------------------------
# Comparing sets
# ----------------------------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors of one shape, over all their values; 0 when either is constant (there is
    no linear relation to measure)."""
    if a.shape != b.shape:
        raise ValueError(f"pearson needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.double().flatten(), b.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    norm = float(x.norm() * y.norm())
    return float(torch.dot(x, y)) / norm if norm > 0 else 0.0


def projection_consistency(samples: torch.Tensor, conditions: torch.Tensor, axis: int) -> dict[str, Any]:
    """How well 3D samples match the 2D conditions they were generated for: the Pearson correlation between each
    sample's sum-projection along ``axis`` and its condition (scale-free, so the projection's normalisation does not
    matter), with a baseline: each sample against the next sample's condition (``mismatched``), the correlation that
    generic structure alone gives.

    Args:
        samples: ``(N, C, X, Y, Z)`` generated volumes.
        conditions: ``(N, C, H, W)`` the projection each sample was generated for, the shape of the samples'
            projections along ``axis``.
        axis: the spatial axis the model projects along (its ``diffusion.projection_axis``).

    Returns:
        ``{"axis", "count", "mean", "per_sample", "mismatched_mean"}`` (``mismatched_mean`` None for one sample).
    """
    from .sampling import projection

    if samples.ndim != 5:
        raise ValueError(f"samples must be (N, C, X, Y, Z), got shape {tuple(samples.shape)}")
    proj = projection(samples, axis)
    if tuple(conditions.shape) != tuple(proj.shape):
        raise ValueError(f"conditions have shape {tuple(conditions.shape)}, but the samples' projections along axis "
                         f"{axis} have shape {tuple(proj.shape)}")
    n = proj.shape[0]
    per_sample = [pearson(proj[i], conditions[i]) for i in range(n)]
    mismatched = [pearson(proj[i], conditions[(i + 1) % n]) for i in range(n)] if n > 1 else None
    return {"axis": axis, "count": n, "mean": _round(sum(per_sample) / n),
            "per_sample": [_round(v) for v in per_sample],
            "mismatched_mean": None if mismatched is None else _round(sum(mismatched) / n)}


def _value_range(x: torch.Tensor, lo: float, hi: float) -> dict[str, float]:
    outside = ((x < lo) | (x > hi)).float().mean()
    return {"min": float(x.min()), "max": float(x.max()), "fraction_outside_real_range": float(outside)}


def generation_metrics(
    reference: torch.Tensor,
    candidates: torch.Tensor,
    *,
    seed: int = 0,
    data_range: float | None = None,
    c2st: C2STSettings | None = None,
    fid_extractor: torch.nn.Module | None = None,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """All generation metrics of ``candidates`` against ``reference`` (see the module docstring for the keys).

    Args:
        reference: the reference set (real volumes, or their reconstructions).
        candidates: the set judged (samples, or reconstructions).
        seed: seeds C2ST and the choice of diversity pairs.
        data_range: intensity range for MS-SSIM (default: the reference's max - min).
        c2st: C2ST settings; ``epochs == 0`` skips the test (``c2st_accuracy`` is then ``None``).
        fid_extractor: feature network for ``fid``; without it ``fid`` is left out.
        names: labels of the two sets for error messages (keys ``"real"`` and ``"samples"``).
    """
    cfg = c2st or C2STSettings()
    rng = data_range or float(reference.max() - reference.min()) or 1.0
    nn = nn_ratio(reference, candidates)
    out: dict[str, Any] = {
        "mmd": mmd(reference, candidates),
        "ms_ssim_diversity": ms_ssim_diversity(candidates, rng, seed),
        "ms_ssim_diversity_real": ms_ssim_diversity(reference, rng, seed),
        "histogram_w1": histogram_w1(reference, candidates),
        "nn_ratio": nn["mean"],
        "nn_ratio_min": nn["min"],
        "nn_ratio_details": nn,
    }
    if cfg.epochs > 0:
        test = c2st_accuracy(reference, candidates, seed=seed, settings=cfg, names=names)
        out["c2st_accuracy"] = test["accuracy"]
        out["c2st"] = test
    else:
        out["c2st_accuracy"] = None
        out["c2st"] = {"skipped": "epochs = 0"}
    if fid_extractor is not None:
        out["fid"] = fid(reference, candidates, fid_extractor)
    return out


def _set_info(x: torch.Tensor, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    info = {"count": int(x.shape[0]), "shape": list(x.shape[1:]), "min": float(x.min()), "max": float(x.max())}
    if meta:
        info.update({k: meta[k] for k in ("folder", "files", "spacing", "ignored") if k in meta})
    return info


def compare_sets(
    real: torch.Tensor,
    samples: torch.Tensor,
    *,
    recon: torch.Tensor | None = None,
    seed: int = 0,
    c2st: C2STSettings | None = None,
    fid_weights: str | os.PathLike | None = None,
    names: Mapping[str, str] | None = None,
    meta: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Compare generated volumes with real ones (and with the real ones' reconstructions, when given).

    Every input is checked (shapes, counts for MMD, diversity, nn_ratio and the C2ST split, the FID weights file)
    before any metric is computed.

    Args:
        real: the real (training or validation) volumes, ``(N, C, *spatial)``, at least 2.
        samples: generated volumes, same ``(C, *spatial)``, at least 2.
        recon: the autoencoder's reconstructions of ``real``, in the same order (optional). With them the report
            also holds ``samples_vs_recon`` (stage 2 alone: the reconstructions are the best a latent model can do)
            and ``recon_vs_real`` (stage 1: generation metrics plus paired ``reconstruction`` metrics).
        seed: seeds C2ST and the choice of diversity pairs.
        c2st: C2ST settings (default :class:`C2STSettings`).
        fid_weights: a local feature-extractor file for ``fid`` (see :func:`load_feature_extractor`).
        names: human labels of the sets for messages, e.g. folders: keys ``"real"``, ``"samples"``, ``"recon"``.
        meta: per-set metadata from :func:`load_volume_folder` (keys ``"real"``, ``"samples"``, ``"recon"``).

    Returns:
        The report dictionary (see ``docs/evaluate.md``).
    """
    cfg = c2st or C2STSettings()
    names = dict(names or {})
    label = {k: names.get(k, d) for k, d in (("real", "real"), ("samples", "samples"), ("recon", "reconstructions"))}
    _check_volumes(real, label["real"], 2)
    _check_volumes(samples, label["samples"], 2)
    _check_same_shape(real, samples, label["real"], label["samples"])
    if cfg.epochs > 0:
        _check_c2st_counts(real.shape[0], samples.shape[0], cfg, label)
    if recon is not None:
        _check_volumes(recon, label["recon"], 2)
        if recon.shape != real.shape:
            raise EvaluateError(
                f"{label['recon']} ({recon.shape[0]} volumes of shape {list(recon.shape[1:])}) must pair up with "
                f"{label['real']} ({real.shape[0]} volumes of shape {list(real.shape[1:])})"
            )
        if cfg.epochs > 0:
            _check_c2st_counts(recon.shape[0], samples.shape[0], cfg, {"real": label["recon"], "samples": label["samples"]})
    ms_ssim_settings(real.shape[2:])
    extractor = load_feature_extractor(fid_weights) if fid_weights is not None else None

    lo, hi = float(real.min()), float(real.max())
    data_range = hi - lo
    if data_range <= 0:
        raise EvaluateError(f"{label['real']}: all {real.shape[0]} volumes are constant ({lo}); there is no data range")
    meta = meta or {}
    report: dict[str, Any] = {
        "kind": "monai_diffusion.evaluate",
        "version": REPORT_VERSION,
        "settings": {
            "seed": seed,
            "data_range": data_range,
            "c2st": {**asdict(cfg), "channels": list(cfg.channels), "max_side": cfg.max_side or C2ST_SIZE[real.ndim - 2]},
            "mmd_max_side": MMD_SIZE[real.ndim - 2],
            "ms_ssim": ms_ssim_settings(real.shape[2:]),
            "diversity_max_pairs": MAX_PAIRS,
            "fid_weights": str(fid_weights) if fid_weights is not None else None,
        },
        "real": _set_info(real, meta.get("real")),
        "samples": {**_set_info(samples, meta.get("samples")), **_value_range(samples, lo, hi)},
    }
    steps = ["samples vs real"] + (["samples vs recon", "recon vs real"] if recon is not None else [])
    progress = tqdm(steps, desc="evaluate", leave=False)
    common = dict(seed=seed, data_range=data_range, c2st=cfg, fid_extractor=extractor)
    progress.set_postfix_str(steps[0])
    report["samples_vs_real"] = generation_metrics(
        real, samples, names={"real": label["real"], "samples": label["samples"]}, **common
    )
    progress.update()
    if recon is not None:
        report["recon"] = {**_set_info(recon, meta.get("recon")), **_value_range(recon, lo, hi)}
        progress.set_postfix_str(steps[1])
        report["samples_vs_recon"] = generation_metrics(
            recon, samples, names={"real": label["recon"], "samples": label["samples"]}, **common
        )
        progress.update()
        progress.set_postfix_str(steps[2])
        block = generation_metrics(real, recon, names={"real": label["real"], "samples": label["recon"]}, **common)
        block["reconstruction"] = reconstruction_metrics(real, recon, data_range=data_range)
        report["recon_vs_real"] = block
        progress.update()
    progress.close()
    return report


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


SUMMARY_KEYS = (
    "c2st_accuracy",
    "mmd",
    "histogram_w1",
    "nn_ratio",
    "nn_ratio_min",
    "ms_ssim_diversity",
    "ms_ssim_diversity_real",
    "fid",
)
BLOCKS = (
    ("samples_vs_real", "samples vs real"),
    ("samples_vs_recon", "samples vs recon"),
    ("recon_vs_real", "recon vs real"),
)


def summary_table(report: Mapping[str, Any]) -> str:
    """A Markdown table of the headline metrics, one column per comparison."""
    blocks = [(key, title) for key, title in BLOCKS if key in report]
    lines = ["| metric | " + " | ".join(t for _, t in blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
    for name in SUMMARY_KEYS:
        if not any(name in report[key] for key, _ in blocks):
            continue
        lines.append(f"| {name} | " + " | ".join(_fmt(report[key].get(name)) for key, _ in blocks) + " |")
    rec = report.get("recon_vs_real", {}).get("reconstruction")
    if rec:
        for name in ("psnr", "ssim", "ms_ssim", "l1"):
            cells = [_fmt(rec[name]) if key == "recon_vs_real" else "" for key, _ in blocks]
            lines.append(f"| {name} (paired) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(report: Mapping[str, Any], png_name: str | None) -> str:
    s = report.get("samples", {})
    r = report.get("real", {})
    c2st = report.get("samples_vs_real", {}).get("c2st", {})
    lines = [
        "# Evaluation report",
        "",
        f"- real: {r.get('count')} volumes of shape {r.get('shape')}" + (f" from `{r['folder']}`" if "folder" in r else ""),
        f"- samples: {s.get('count')} volumes of shape {s.get('shape')}" + (f" from `{s['folder']}`" if "folder" in s else ""),
    ]
    if "recon" in report:
        rc = report["recon"]
        lines.append(f"- reconstructions: {rc.get('count')} volumes" + (f" from `{rc['folder']}`" if "folder" in rc else ""))
    lines += [
        f"- sample values: min {_fmt(s.get('min'))}, max {_fmt(s.get('max'))}, "
        f"{100 * s.get('fraction_outside_real_range', 0.0):.3g}% of voxels outside the real range "
        f"[{_fmt(r.get('min'))}, {_fmt(r.get('max'))}]",
    ]
    if "accuracy" in c2st:
        lines.append(
            f"- C2ST: {c2st['train_per_set']} training and {c2st['test_per_set']} test volumes per set, "
            f"{c2st['epochs']} epochs, seed {c2st['seed']}, input {c2st['input_shape']}"
        )
    if "projection_consistency" in report:
        pc = report["projection_consistency"]
        lines.append(f"- projection consistency (Pearson r of each sample's projection along axis {pc['axis']} with "
                     f"its condition, {pc['count']} samples): mean {_fmt(pc['mean'])}; against another sample's "
                     f"condition: {_fmt(pc['mismatched_mean'])}")
    lines += ["", summary_table(report), "", "Definitions of every key: `monai_diffusion/docs/evaluate.md`."]
    if png_name:
        lines += ["", f"![real, reconstructed and generated mid-slices]({png_name})"]
    return "\n".join(lines) + "\n"


def _panels(volume: torch.Tensor) -> list[np.ndarray]:
    """Mid-slices of the first channel of a (C, *spatial) volume: one per plane (3D) or the image (2D)."""
    v = volume[0].detach().float().cpu()
    if v.ndim == 2:
        return [v.transpose(0, 1).flip(0).numpy()]
    return [v.select(axis, v.shape[axis] // 2).transpose(0, 1).flip(0).numpy() for axis in range(3)]


def picture_grid(rows: Sequence[tuple[str, torch.Tensor]], window: tuple[float, float], max_columns: int = 4):
    """A labelled PIL image: one row per set, up to ``max_columns`` volumes each, mid-slices in every plane.

    All panels share one intensity window (the real data's range), so brightness differences and values outside
    the range (clipped) show. Slices are shown with square pixels (spacing is ignored), the slice's first remaining
    axis horizontal; small panels are enlarged by an integer factor with nearest-neighbour sampling.
    """
    from PIL import Image, ImageDraw

    lo, hi = window
    per_volume = [[_panels(v) for v in x[:max_columns]] for _, x in rows]
    panel_h = max(p.shape[0] for vols in per_volume for ps in vols for p in ps)
    zoom = max(1, math.ceil(96 / panel_h))
    gap, label_w = 4, 120
    tiles = []
    for vols in per_volume:
        row = []
        for ps in vols:
            for p in ps:
                img = np.clip((p - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
                img = np.kron(img, np.ones((zoom, zoom)))
                row.append(img)
            row.append(None)  # wider gap between volumes
        tiles.append(row[:-1])
    height = panel_h * zoom
    header = 16
    widths = [sum(t.shape[1] + gap if t is not None else 3 * gap for t in row) for row in tiles]
    canvas = Image.new("L", (label_w + max(widths), header + len(tiles) * (height + gap) + gap), color=32)
    draw = ImageDraw.Draw(canvas)
    planes = ["image"] if rows[0][1].ndim == 4 else ["axis 0 (sag.)", "axis 1 (cor.)", "axis 2 (ax.)"]
    left = label_w
    for name, t in zip(planes, tiles[0]):
        draw.text((left + 2, 2), name, fill=200)
        left += t.shape[1] + gap
    for r, ((title, x), row) in enumerate(zip(rows, tiles)):
        top = header + gap + r * (height + gap)
        draw.text((6, top + height // 2 - 6), f"{title} ({x.shape[0]})", fill=255)
        left = label_w
        for t in row:
            if t is None:
                left += 3 * gap
                continue
            tile = Image.fromarray((t * 255).round().astype(np.uint8), mode="L")
            canvas.paste(tile, (left, top + (height - t.shape[0]) // 2))
            left += t.shape[1] + gap
    return canvas


def write_report(
    report: Mapping[str, Any],
    out_json: str | os.PathLike,
    *,
    real: torch.Tensor | None = None,
    recon: torch.Tensor | None = None,
    samples: torch.Tensor | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the report as JSON, a Markdown summary (``.md``) and a PNG grid (``.png``) next to it.

    The grid has one labelled row each for real, reconstructed and generated volumes (those given), with mid-slices
    in the three planes (2D: the images). Each file is written to a temporary name and renamed. When any of the
    three files exists and ``overwrite`` is false nothing is written.

    Args:
        report: the dictionary from :func:`compare_sets`.
        out_json: the JSON path; the ``.md`` and ``.png`` share its stem.
        real: real volumes for the grid.
        recon: reconstructions for the grid.
        samples: generated volumes for the grid.
        overwrite: replace existing report files.

    Returns:
        The files written.

    Raises:
        EvaluateError: a report file exists (and ``overwrite`` is false), or the folder is missing.
    """
    path = Path(out_json).expanduser()
    if path.suffix.lower() != ".json":
        raise EvaluateError(f"the report file must end in .json, got {str(path)!r}")
    if not path.parent.is_dir():
        raise EvaluateError(f"the report's folder {str(path.parent)!r} does not exist")
    rows = [(t, x) for t, x in (("real", real), ("reconstructed", recon), ("generated", samples)) if x is not None]
    targets = [path, path.with_suffix(".md")] + ([path.with_suffix(".png")] if rows else [])
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise EvaluateError(f"report file {existing[0]!r} already exists; choose another --out or pass --overwrite")
    written = []
    if rows:
        ref = real if real is not None else rows[0][1]
        grid = picture_grid(rows, (float(ref.min()), float(ref.max())))
        import io

        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        atomic_write_bytes(targets[2], buf.getvalue())
        written.append(targets[2])
    text = json.dumps(plain(report, json=True), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    written.append(path)
    atomic_write_bytes(targets[1], _markdown(report, targets[2].name if rows else None).encode("utf-8"))
    written.append(targets[1])
    return written
