"""The metrics of an evaluation, each on float32 tensors of shape ``(N, C, *spatial)`` (2 or 3 spatial dims), defined
in ``docs/evaluate.md``: reconstruction metrics of paired volumes (PSNR, SSIM, MS-SSIM, L1), and the generation
metrics that need no downloaded weights: MMD, MS-SSIM diversity, histogram W1, the nearest-neighbour ratio, and the
projection consistency of a projection-conditioned model. The checks and the downsampling shared with the
classifier two-sample test (:mod:`.c2st`) and FID (:mod:`.features`) live here too."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..conditioning import projection
from ..errors import EvaluateError

MMD_SIZE = {2: 64, 3: 32}  # largest side of the volumes MMD is computed on
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default
MAX_PAIRS = 1000  # diversity: all pairs up to this many, else a seeded random subset


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
