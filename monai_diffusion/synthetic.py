"""Built-in synthetic datasets, written as NIfTI files so that users can look at them.

Three kinds (``KINDS``), each with a small frozen dataclass of generator parameters (``PARAMS[kind]``; both live in
``monai_diffusion.settings.synthetic_kinds``, the settings' data, and are imported here):

* ``phantom``: a head-like soft ellipsoid with a bright rim and bright/dark blobs (no parameters).
* ``microtubules``: single-molecule localisation microscopy (SMLM) of microtubules. Random semiflexible
  filaments (discrete worm-like chains) run mostly laterally through the field; localisations are drawn along
  them, binned into voxels and blurred by an anisotropic Gaussian point-spread function (axial sigma larger
  than lateral). Physical spacing (default 20 x 20 x 25 nm, written in mm) goes into the header.
* ``brain``: real anatomy. The MNI152 2009 T1 template that ships inside nilearn (optional extra
  ``pip install -e ".[brain]"``) is turned into distinct subjects by MONAI's random elastic + affine
  deformation, bias field, gamma contrast and Rician noise, then written at the requested spacing.

Every volume is a deterministic function of ``(kind, params, seed, split, index, voxel_size, spacing)``, holds
float32 values in [0, 1], and 2D variants exist for every kind (``voxel_size`` with two entries).

Typical use::

    train, val = make_synthetic_dataset(run_dir / "synthetic_data", 16, 4, (128, 128, 32), seed=0,
                                        kind="microtubules", params={"max_filaments": 6})

All spacings in this module are in mm, like every NIfTI header the project writes (20 nm = 2e-5 mm).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .errors import DataError
from .fileio import atomic_target, atomic_write_json
from .settings.synthetic_kinds import (  # the kinds and their parameters are plain data the settings own
    KINDS,
    PARAMS,
    BrainParams,
    MicrotubuleParams,
    PhantomParams,
    make_params,
)
from .settings.synthetic_kinds import check_kind as _check_kind

__all__ = [
    "KINDS",
    "PARAMS",
    "PhantomParams",
    "MicrotubuleParams",
    "BrainParams",
    "make_params",
    "default_spacing",
    "generate_volume",
    "make_synthetic_dataset",
    "phantom_blobs",
]

# Bump a kind's version when its output for the same inputs changes; recorded in the manifest.
_VERSIONS = {"phantom": 1, "microtubules": 1, "brain": 1}
_SPLIT_CODES = {"train": 0, "val": 1}
_SYNTHETIC_MANIFEST = "synthetic_manifest.json"
_NM_PER_MM = 1.0e6
# Extent (mm) of the nonzero voxels of nilearn's MNI152 2009 T1 template at 1 mm (x, y, z), measured from the
# template; used to choose a default spacing that fits the brain into a given voxel_size without loading it.
_MNI_BRAIN_EXTENT_MM = (145.0, 181.0, 155.0)
# Free space left around the brain on each side by ``default_spacing("brain", ..., voxel_size)``.
_BRAIN_MARGIN = 0.06
_BRAIN_INSTALL_HINT = 'pip install -e ".[brain]"  (or: pip install "nilearn>=0.10")'


def default_spacing(kind: str, spatial_dims: int, voxel_size: Sequence[int] | None = None) -> tuple[float, ...]:
    """Voxel spacing in mm that suits ``kind``.

    Args:
        kind: one of :data:`KINDS`.
        spatial_dims: 2 or 3.
        voxel_size: optional spatial shape. Only ``brain`` uses it: the isotropic spacing at which the whole
            brain (plus a margin of 6% per side) fits the shape; without it, 2 mm.

    Returns:
        ``phantom``: 1 mm; ``microtubules``: 20 nm laterally and 25 nm axially (as mm: 2e-5, 2.5e-5);
        ``brain``: see ``voxel_size``.
    """
    _check_kind(kind)
    if spatial_dims not in (2, 3):
        raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if kind == "phantom":
        return (1.0,) * spatial_dims
    if kind == "microtubules":
        return (20.0 / _NM_PER_MM, 20.0 / _NM_PER_MM, 25.0 / _NM_PER_MM)[:spatial_dims]
    if voxel_size is None:
        return (2.0,) * spatial_dims
    shape = _check_shape(voxel_size)
    if len(shape) != spatial_dims:
        raise DataError(f"voxel_size {list(shape)} does not have spatial_dims={spatial_dims} entries")
    extent = _MNI_BRAIN_EXTENT_MM[: len(shape)]  # 2D: an axial slice (x, y)
    fit = max(e * (1.0 + 2.0 * _BRAIN_MARGIN) / s for e, s in zip(extent, shape))
    return (math.ceil(fit * 100.0) / 100.0,) * spatial_dims


# ----------------------------------------------------------------------------------------------
# phantom
# ----------------------------------------------------------------------------------------------


def _random_rotation(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    q = q * np.sign(np.diag(r))
    return q


def _soft_ellipsoid(coords: np.ndarray, center, radii, rot, sharpness: float) -> np.ndarray:
    """Smooth indicator of an ellipsoid; coords has shape (N, *spatial)."""
    n = coords.shape[0]
    d = coords - np.asarray(center, dtype=np.float32).reshape((n,) + (1,) * n)
    local = np.tensordot(rot.T.astype(np.float32), d, axes=1)
    r = np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(n)))
    return 0.5 * (1.0 + np.tanh((1.0 - r) * (sharpness / 2.0)))


def _phantom_layers(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, float]]]:
    """The phantom and what it is made of: ``(image, head, blobs)``, ``blobs`` a list of ``(soft indicator, level)``
    in drawing order (each blob replaces what is under it inside the head). :func:`_phantom` keeps the image."""
    n = len(shape)
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float32) if s > 1 else np.zeros(1, np.float32) for s in shape]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    sharp = 0.6 * max(shape)  # edge width of about two voxels
    rot = _random_rotation(rng, n)
    center = rng.normal(0.0, 0.04, size=n)
    radii = rng.uniform(0.62, 0.82, size=n)
    outer = _soft_ellipsoid(coords, center, radii * 1.1, rot, sharp)
    head = _soft_ellipsoid(coords, center, radii, rot, sharp)
    img = 0.85 * (outer - head) + rng.uniform(0.3, 0.4) * head
    blobs = []
    for k in range(int(rng.integers(3, 7))):
        offset = rot @ (rng.uniform(-0.45, 0.45, size=n) * radii)
        b_radii = rng.uniform(0.12, 0.3, size=n) * radii
        level = rng.uniform(0.05, 0.15) if k == 0 else rng.uniform(0.55, 1.0)
        blob = _soft_ellipsoid(coords, center + offset, b_radii, _random_rotation(rng, n), sharp)
        img = img * (1.0 - blob * head) + level * blob * head
        blobs.append((blob, float(level)))
    img = img + rng.normal(0.0, 0.02, size=img.shape) * (0.25 + outer)
    return np.clip(img, 0.0, None).astype(np.float32), head, blobs


def _phantom(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A head-like phantom: a soft ellipsoid with a bright rim, bright and dark blobs, mild noise."""
    return _phantom_layers(shape, rng)[0]


def phantom_blobs(voxel_size: Sequence[int], seed: int = 0, split: str = "train", index: int = 0) -> dict[str, Any]:
    """The blobs of one built-in phantom, for measuring whether a model keeps them.

    The phantom is regenerated from the same random stream as :func:`generate_volume` ``("phantom", voxel_size,
    seed=seed, split=split, index=index)``, so ``image`` is exactly that volume.

    Args:
        voxel_size: spatial shape, 2 or 3 ints.
        seed: base random seed of the dataset (``data.synthetic.seed``).
        split: ``"train"`` or ``"val"``.
        index: index of the volume within the split.

    Returns:
        ``{"image": the phantom, "head": soft indicator of the head (the inside of the rim), "blobs": [...]}``; each
        blob is ``{"weight": float32 array, "level": intensity, "dark": bool}`` in drawing order, where ``weight`` is
        how much of each voxel shows this blob (its soft indicator times the head's, times ``1 - weight`` of every
        blob drawn over it later), in [0, 1]. The first blob is the dark one (level 0.05-0.15), the others bright
        (0.55-1.0).
    """
    shape = _check_shape(voxel_size)
    if split not in _SPLIT_CODES:
        raise DataError(f"split must be one of {list(_SPLIT_CODES)}, got {split!r}")
    image, head, layers = _phantom_layers(shape, _rng("phantom", seed, split, index))
    shown = [blob * head for blob, _ in layers]
    blobs = []
    for k, (_, level) in enumerate(layers):
        weight = shown[k]
        for later in shown[k + 1:]:
            weight = weight * (1.0 - later)
        blobs.append({"weight": weight.astype(np.float32), "level": level, "dark": k == 0})
    return {"image": image, "head": head.astype(np.float32), "blobs": blobs}


# ----------------------------------------------------------------------------------------------
# microtubules
# ----------------------------------------------------------------------------------------------


def _unit_gaussian_peak(sigma: float) -> float:
    """Centre value of the normalised discrete Gaussian kernel MONAI uses (``erf`` approximation)."""
    if sigma <= 0:
        return 1.0
    from monai.networks.layers.convutils import gaussian_1d

    k = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="erf", normalize=True)
    return float(k.max())


def _worm_like_chains(
    rng: np.random.Generator, field_nm: np.ndarray, count: int, p: MicrotubuleParams, step_nm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Discrete worm-like chains: ``(points, tangents)`` of shape ``(2 * count, steps, n)``.

    Each filament passes through a uniform random point of the field and is grown in both directions (two
    chains starting back to back) for about the lateral diagonal of the field. The tangent turns by Gaussian
    angles of variance ``step / persistence_length`` per perpendicular direction; in 3D its elevation is held
    within ``max_tilt_deg`` of the lateral plane, so filaments run mostly laterally.
    """
    n = len(field_nm)
    lateral_diag = float(np.linalg.norm(field_nm[:2]))
    steps = int(math.ceil(1.05 * lateral_diag / step_nm)) + 1
    centers = rng.uniform(0.0, 1.0, size=(count, n)) * field_nm
    if n == 3:  # start in the middle 60% of the depth, so that most of each filament stays in the field
        centers[:, 2] = rng.uniform(0.2, 0.8, size=count) * field_nm[2]
    phi = rng.uniform(0.0, 2.0 * math.pi, size=count)
    if n == 3:
        max_tilt = math.radians(p.max_tilt_deg)
        elev = rng.uniform(-max_tilt, max_tilt, size=count)
        t0 = np.stack([np.cos(elev) * np.cos(phi), np.cos(elev) * np.sin(phi), np.sin(elev)], axis=1)
        zmax = math.tan(max_tilt) if p.max_tilt_deg < 90.0 else None  # largest |t_z| / |t_xy|
    else:
        t0 = np.stack([np.cos(phi), np.sin(phi)], axis=1)
        zmax = None
    pos = np.concatenate([centers, centers])  # forward chains, then backward chains
    tan = np.concatenate([t0, -t0])
    kappa = math.sqrt(step_nm / (p.persistence_length_um * 1000.0))
    points = np.empty((steps,) + pos.shape)
    tangents = np.empty_like(points)
    noise = rng.normal(0.0, kappa, size=(steps,) + pos.shape)
    for k in range(steps):
        points[k], tangents[k] = pos, tan
        xi = noise[k]
        xi = xi - np.sum(xi * tan, axis=1, keepdims=True) * tan  # perpendicular kick
        tan = tan + xi
        if zmax is not None:
            limit = zmax * np.linalg.norm(tan[:, :2], axis=1)
            tan[:, 2] = np.clip(tan[:, 2], -limit, limit)
        tan = tan / np.linalg.norm(tan, axis=1, keepdims=True)
        pos = pos + step_nm * tan
    return points.transpose(1, 0, 2), tangents.transpose(1, 0, 2)


def _microtubules(shape: Sequence[int], spacing_mm: Sequence[float], rng: np.random.Generator, p: MicrotubuleParams):
    """An SMLM-like rendering of random semiflexible filaments, float32 in [0, 1]."""
    from monai.transforms import GaussianSmooth

    shape = tuple(int(s) for s in shape)
    n = len(shape)
    sp_nm = np.asarray(spacing_mm, dtype=np.float64) * _NM_PER_MM
    field_nm = np.asarray(shape, dtype=np.float64) * sp_nm
    step_nm = 0.5 * float(sp_nm[:2].min())
    count = int(rng.integers(p.min_filaments, p.max_filaments + 1))
    points, tangents = _worm_like_chains(rng, field_nm, count, p, step_nm)
    points, tangents = points.reshape(-1, n), tangents.reshape(-1, n)

    # Localisations: Poisson along each chain segment, uniform within it; then unspecific background.
    per_segment = rng.poisson(p.localizations_per_um * step_nm / 1000.0, size=len(points))
    seg = np.repeat(np.arange(len(points)), per_segment)
    locs = points[seg] + rng.uniform(0.0, step_nm, size=(len(seg), 1)) * tangents[seg]
    field_um = field_nm / 1000.0
    n_background = int(rng.poisson(p.background_density * float(np.prod(field_um))))
    locs = np.concatenate([locs, rng.uniform(0.0, 1.0, size=(n_background, n)) * field_nm])

    # Bin into voxels (= integrating the PSF-blurred density over each voxel, after the blur below).
    idx = np.floor(locs / sp_nm).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    flat = np.ravel_multi_index(tuple(idx[inside].T), shape)
    counts = np.bincount(flat, minlength=int(np.prod(shape))).reshape(shape).astype(np.float32)

    sigma_nm = np.full(n, p.psf_sigma_nm)
    if n == 3:
        sigma_nm[2] *= p.axial_ratio
    sigma_vox = sigma_nm / sp_nm
    img = GaussianSmooth(sigma=[float(s) for s in sigma_vox])(torch.from_numpy(counts)[None])[0]
    img = np.asarray(img, dtype=np.float32)

    # An isolated in-focus lateral filament: localisations per voxel length, spread over the perpendicular axes.
    reference = p.localizations_per_um * float(sp_nm[0]) / 1000.0
    for s in sigma_vox[1:]:
        reference *= _unit_gaussian_peak(float(s))
    img = 1.0 - np.exp(-math.log(4.0) * np.clip(img, 0.0, None) / reference)  # 0.75 at the reference peak
    if p.gaussian_noise > 0:
        img = img + rng.normal(0.0, p.gaussian_noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# brain
# ----------------------------------------------------------------------------------------------


def _nilearn_template_loader():
    """nilearn's ``load_mni152_template``, or a DataError telling the user how to install nilearn."""
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError as e:
        raise DataError(
            "the 'brain' synthetic dataset needs nilearn, which ships the MNI152 2009 T1 template (no download); "
            f"install it with: {_BRAIN_INSTALL_HINT}"
        ) from e
    return load_mni152_template


@lru_cache(maxsize=1)
def _mni_template() -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm MNI152 2009 T1 template from the nilearn package, cropped to the brain: ``(data, affine)``."""
    img = _nilearn_template_loader()(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    nz = np.argwhere(data > 0)
    lo, hi = nz.min(0), nz.max(0) + 1
    data = data[tuple(slice(a, b) for a, b in zip(lo, hi))]
    data = data / float(np.percentile(data[data > 0], 99.5))
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ lo
    return np.clip(data, 0.0, 1.0).astype(np.float32), affine


def _require_nilearn() -> None:
    """Fail early (before any volume is written) when the brain template is unavailable."""
    _nilearn_template_loader()


@lru_cache(maxsize=4)
def _template_at(spacing: tuple[float, ...], slice_mm: float | None) -> torch.Tensor:
    """The template (or the axial slice ``slice_mm`` mm above the brain's middle) resampled to ``spacing``."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    data, affine = _mni_template()
    if slice_mm is None:
        src = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(affine))
    else:
        z = int(round(data.shape[2] / 2.0 + slice_mm / affine[2, 2]))
        z = min(max(z, 0), data.shape[2] - 1)
        a2 = np.eye(4)
        a2[:2, :2], a2[:2, 3] = affine[:2, :2], affine[:2, 3]
        src = MetaTensor(torch.from_numpy(np.ascontiguousarray(data[:, :, z]))[None], affine=torch.as_tensor(a2))
    out = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros")(src)
    return out.as_tensor().float()


def _brain(shape: Sequence[int], spacing_mm: Sequence[float], rng: np.random.Generator, p: BrainParams) -> np.ndarray:
    """One deformed copy of the MNI template at ``spacing_mm``, centred in ``shape``; float32 in [0, 1]."""
    from monai.transforms import RandAdjustContrast, RandBiasField, RandRicianNoise
    from monai.transforms import Rand2DElastic, Rand3DElastic

    shape = tuple(int(s) for s in shape)
    n = len(shape)
    spacing = tuple(float(s) for s in spacing_mm)
    seeds = rng.integers(0, 2**31 - 1, size=5)
    slice_mm = None
    if n == 2:  # quantised to 1 mm so that the resampled slices can be cached
        slice_mm = float(round(rng.uniform(-p.slice_jitter_mm, p.slice_jitter_mm)))
    src = _template_at(spacing, slice_mm)

    sp = np.asarray(spacing)
    rotate = (math.radians(p.rotate_deg),) * (3 if n == 3 else 1)
    translate = tuple(p.translate_mm / s for s in sp)
    scale = (p.scale,) * n
    sigma_vox = p.elastic_sigma_mm / float(sp.mean())
    disp_vox = p.elastic_mm / float(sp.mean())
    if n == 3:
        # MONAI smooths uniform(-1, 1) noise with a Gaussian of sigma_vox and multiplies by the magnitude;
        # the smoothed field has std ~ sqrt(1/3) * (2 sqrt(pi) sigma)^(-3/2), so divide that out.
        field_std = math.sqrt(1.0 / 3.0) * (2.0 * math.sqrt(math.pi) * sigma_vox) ** -1.5
        mag = disp_vox / field_std
        deform = Rand3DElastic(
            sigma_range=(0.8 * sigma_vox, 1.2 * sigma_vox), magnitude_range=(0.5 * mag, 1.5 * mag),
            prob=1.0, rotate_range=rotate, translate_range=translate, scale_range=scale, spatial_size=shape,
            mode="bilinear", padding_mode="zeros",
        )
    else:
        # 2D: MONAI moves a control grid (spacing in voxels) by Gaussian offsets whose std is the magnitude.
        deform = Rand2DElastic(
            spacing=(2.0 * sigma_vox, 2.0 * sigma_vox), magnitude_range=(0.5 * disp_vox, 1.5 * disp_vox),
            prob=1.0, rotate_range=rotate, translate_range=translate, scale_range=scale, spatial_size=shape,
            mode="bilinear", padding_mode="zeros",
        )
    bias = RandBiasField(degree=3, coeff_range=(-p.bias, p.bias) if p.bias > 0 else (0.0, 0.0), prob=1.0)
    contrast = RandAdjustContrast(prob=1.0, gamma=(1.0 - p.gamma, 1.0 + p.gamma) if p.gamma > 0 else (1.0, 1.0))
    noise = RandRicianNoise(prob=1.0 if p.rician_noise > 0 else 0.0, std=max(p.rician_noise, 1e-12), sample_std=True)
    for t, s in zip((deform, bias, contrast, noise), seeds):
        t.set_random_state(seed=int(s))

    with torch.no_grad():
        img = deform(src)
        img = torch.as_tensor(img).clamp_min(0.0)
        mask = img > 0.02
        img = bias(img) * mask
        img = contrast(img)
        brain_vals = img[mask]
        brain_vals = brain_vals[:: max(1, brain_vals.numel() // 200_000)]  # torch.quantile limits the input size
        top = float(torch.quantile(brain_vals, 0.995)) if brain_vals.numel() else 1.0
        img = img / max(top, 1e-6)
        img = noise(img.clamp(0.0, 1.0))
    return np.clip(np.asarray(torch.as_tensor(img)[0], dtype=np.float32), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# One volume, and the dataset on disk
# ----------------------------------------------------------------------------------------------


def _check_shape(voxel_size: Any) -> list[int]:
    try:
        shape = [int(v) for v in voxel_size]
        ok = all(int(v) == v for v in voxel_size)
    except (TypeError, ValueError):
        ok, shape = False, []
    if not ok or len(shape) not in (2, 3) or min(shape) < 1:
        raise DataError(f"synthetic voxel_size must be 2 or 3 positive ints, got {voxel_size!r}")
    return shape


def _check_spacing(spacing: Any, kind: str, shape: Sequence[int]) -> list[float]:
    if spacing is None:
        return list(default_spacing(kind, len(shape), shape))
    try:
        values = [float(s) for s in spacing][: len(shape)]
    except (TypeError, ValueError):
        values = []
    if len(values) != len(shape) or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise DataError(f"synthetic spacing must have {len(shape)} positive values (mm), got {spacing!r}")
    return values


# Limits that catch a spacing in the wrong unit before it costs minutes or all the memory.
_MAX_LOCALIZATIONS = 20_000_000
_MIN_BRAIN_SPACING_MM = 0.5


def _check_feasible(kind: str, shape: Sequence[int], spacing: Sequence[float], p: Any) -> None:
    """Raise before generating when ``spacing`` would make the generator unreasonably large."""
    if kind == "microtubules":
        field_um = np.asarray(shape, dtype=np.float64) * np.asarray(spacing) * (_NM_PER_MM / 1000.0)
        chain_um = 2.0 * 1.05 * float(np.linalg.norm(field_um[:2]))  # both halves of one filament
        expected = p.max_filaments * chain_um * p.localizations_per_um + p.background_density * float(np.prod(field_um))
        if expected > _MAX_LOCALIZATIONS:
            raise DataError(
                f"synthetic microtubules: spacing {list(spacing)} mm makes a field of "
                f"{' x '.join(f'{v:g}' for v in field_um)} um, about {expected:.3g} localisations (limit "
                f"{_MAX_LOCALIZATIONS:.0e}); SMLM spacings are tens of nm, e.g. "
                f"{list(default_spacing(kind, len(shape)))} mm"
            )
    elif kind == "brain" and min(spacing) < _MIN_BRAIN_SPACING_MM:
        raise DataError(
            f"synthetic brain: spacing {list(spacing)} mm is finer than {_MIN_BRAIN_SPACING_MM} mm; the template has "
            f"1 mm voxels, so use >= {_MIN_BRAIN_SPACING_MM} mm (default for this voxel_size: "
            f"{list(default_spacing(kind, len(shape), shape))} mm)"
        )


def _rng(kind: str, seed: int, split: str, index: int) -> np.random.Generator:
    """The generator's random stream for one volume (the phantom keeps its original seeding)."""
    key = [int(seed), _SPLIT_CODES[split], int(index)]
    if kind != "phantom":
        key.append(KINDS.index(kind))
    return np.random.default_rng(key)


def _generate(kind: str, shape: list[int], spacing: list[float], params: Any, rng: np.random.Generator) -> np.ndarray:
    if kind == "phantom":
        return _phantom(shape, rng)
    if kind == "microtubules":
        return _microtubules(shape, spacing, rng, params)
    return _brain(shape, spacing, rng, params)


def generate_volume(
    kind: str,
    voxel_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    params: Mapping[str, Any] | Any | None = None,
    split: str = "train",
    index: int = 0,
) -> np.ndarray:
    """One synthetic volume in memory, exactly as :func:`make_synthetic_dataset` would write it.

    Args:
        kind: one of :data:`KINDS`.
        voxel_size: spatial shape, 2 or 3 ints.
        spacing: voxel spacing in mm, or None for :func:`default_spacing`.
        seed: base random seed.
        params: generator parameters (see :func:`make_params`).
        split: ``"train"`` or ``"val"``.
        index: index of the volume within the split.

    Returns:
        float32 array of shape ``voxel_size`` with values in [0, 1] (``phantom``: >= 0, about <= 1).
    """
    kind = _check_kind(kind)
    p = make_params(kind, params)
    shape = _check_shape(voxel_size)
    spacing_l = _check_spacing(spacing, kind, shape)
    if split not in _SPLIT_CODES:
        raise DataError(f"split must be one of {list(_SPLIT_CODES)}, got {split!r}")
    _check_feasible(kind, shape, spacing_l, p)
    if kind == "brain":
        _require_nilearn()
    return _generate(kind, shape, spacing_l, p, _rng(kind, seed, split, index))


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Diagonal affine with the given spacing and the origin at the centre of the volume."""
    affine = np.eye(4)
    for i, (s, sp) in enumerate(zip(shape, spacing)):
        affine[i, i] = sp
        affine[i, 3] = -(s - 1) / 2.0 * sp
    return affine


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _software() -> dict:
    """Versions that the generators depend on (informative; not compared when reusing files)."""
    import monai

    out = {"numpy": np.__version__, "torch": torch.__version__, "monai": monai.__version__}
    try:
        import nilearn

        out["nilearn"] = nilearn.__version__
    except ImportError:
        pass
    return out


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    voxel_size: Sequence[int],
    seed: int,
    spacing: Sequence[float] | None = None,
    kind: str = "phantom",
    params: Mapping[str, Any] | Any | None = None,
) -> tuple[list[str], list[str]]:
    """Write deterministic synthetic volumes ``train_000.nii.gz``... and ``val_000.nii.gz``... into ``out_dir``.

    Each volume depends only on ``(kind, params, seed, split, index, voxel_size, spacing)``, so asking for more
    volumes later keeps the existing ones. A manifest (``synthetic_manifest.json``) records the kind, the
    generator parameters and a checksum per file; existing files made with the same inputs are reused without
    being rewritten. An existing file that differs from what would be written is never overwritten: a
    :class:`~monai_diffusion.errors.DataError` names it. Files and the manifest are written atomically.

    Args:
        out_dir: folder to write into (created if needed).
        num_train: number of training volumes (>= 1).
        num_val: number of validation volumes (>= 0).
        voxel_size: spatial shape, 2 or 3 ints (2 -> 2D images).
        seed: base random seed.
        spacing: voxel spacing in mm written to the header (only the first ``len(voxel_size)`` values are used);
            None -> :func:`default_spacing` ``(kind, len(voxel_size), voxel_size)``.
        kind: one of :data:`KINDS` (``phantom``, ``microtubules``, ``brain``).
        params: generator parameters of ``kind`` (a mapping of overrides, or a ``PARAMS[kind]`` instance).

    Returns:
        ``(train_files, val_files)``: absolute paths.

    Raises:
        DataError (a ValueError): bad kind, parameter, shape, spacing or counts; nilearn missing for ``brain``;
            an existing file that differs.
    """
    kind = _check_kind(kind)
    p = make_params(kind, params)
    shape = _check_shape(voxel_size)
    spacing_l = _check_spacing(spacing, kind, shape)
    if isinstance(num_train, bool) or isinstance(num_val, bool) or int(num_train) < 1 or int(num_val) < 0:
        raise DataError(f"synthetic dataset needs num_train >= 1 and num_val >= 0, got {num_train!r}, {num_val!r}")
    _check_feasible(kind, shape, spacing_l, p)
    if kind == "brain":
        _require_nilearn()
    gen_params = dataclasses.asdict(p)

    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / _SYNTHETIC_MANIFEST
    manifest: dict = {
        "generator": f"monai_diffusion.synthetic {kind} v{_VERSIONS[kind]}",
        "kind": kind,
        "params": gen_params,
        "software": _software(),
        "files": {},
    }
    if manifest_path.is_file():
        try:
            with open(manifest_path, encoding="utf-8") as f:
                loaded = json.load(f)
            if isinstance(loaded, dict) and isinstance(loaded.get("files"), dict):
                manifest["files"].update(loaded["files"])
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"synthetic manifest {str(manifest_path)!r} is unreadable; existing files will be verified")

    changed = False
    result: dict[str, list[str]] = {"train": [], "val": []}
    for split, count in (("train", int(num_train)), ("val", int(num_val))):
        for index in range(count):
            name = f"{split}_{index:03d}.nii.gz"
            path = out / name
            record_params = {
                "kind": kind,
                "version": _VERSIONS[kind],
                "generator_params": gen_params,
                "seed": int(seed),
                "split": split,
                "index": index,
                "voxel_size": shape,
                "spacing": spacing_l,
            }
            record = manifest["files"].get(name)
            if (
                path.is_file()
                and isinstance(record, dict)
                and record.get("params") == record_params
                and record.get("sha256") == _sha256(path)
            ):
                result[split].append(str(path))
                continue
            data = _generate(kind, shape, spacing_l, p, _rng(kind, seed, split, index))
            affine = _affine(shape, spacing_l)
            if path.exists():
                # Not recorded with these inputs: reuse only if it holds exactly what we would write.
                same = False
                try:
                    existing = nib.load(str(path))
                    same = (
                        tuple(existing.shape) == tuple(shape)
                        and np.allclose(existing.affine, affine)
                        and np.array_equal(np.asarray(existing.dataobj, dtype=np.float32), data)
                    )
                except Exception:  # unreadable -> different
                    same = False
                if not same:
                    raise DataError(
                        f"synthetic data file {str(path)!r} already exists and differs from the {kind!r} volume "
                        f"make_synthetic_dataset would write (seed={seed}, voxel_size={shape}, spacing={spacing_l}, "
                        f"params={gen_params}); refusing to overwrite it: delete it or choose another output folder"
                    )
            else:
                img = nib.Nifti1Image(data, affine)
                img.header.set_xyzt_units("mm")
                with atomic_target(path) as tmp:
                    nib.save(img, str(tmp))
            manifest["files"][name] = {"params": record_params, "sha256": _sha256(path)}
            changed = True
            result[split].append(str(path))
    if changed:
        atomic_write_json(manifest_path, manifest)
    return result["train"], result["val"]
