"""The built-in synthetic datasets' kinds and their generator parameters, as plain data the settings own.

Three kinds (:data:`KINDS`), each with a small frozen dataclass of generator parameters (``PARAMS[kind]``). The
settings schema lays every parameter of every kind out flat under ``data.synthetic`` (their names are unique across
kinds) and validation checks the chosen kind's parameters with :func:`make_params`; ``monai_diffusion.synthetic``
generates the volumes from them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .fields import setting as _p

__all__ = ["KINDS", "PARAMS", "PhantomParams", "MicrotubuleParams", "BrainParams", "check_kind", "make_params"]

KINDS = ("phantom", "microtubules", "brain")


def _check_bounds(obj: Any, kind: str) -> None:
    """Check types and the ``ge``/``gt``/``le`` bounds of every field of a parameter dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"data.synthetic.{f.name} ({kind})"
        if isinstance(f.default, bool):
            if not isinstance(value, bool):
                raise DataError(f"{key} must be true or false, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{key} must be a number, got {value!r}")
        if isinstance(f.default, int) and not isinstance(value, int):
            raise DataError(f"{key} must be an integer, got {value!r}")
        if not math.isfinite(value):
            raise DataError(f"{key} must be finite, got {value!r}")
        m = f.metadata
        if m.get("ge") is not None and value < m["ge"]:
            raise DataError(f"{key} must be >= {m['ge']}, got {value!r}")
        if m.get("gt") is not None and value <= m["gt"]:
            raise DataError(f"{key} must be > {m['gt']}, got {value!r}")
        if m.get("le") is not None and value > m["le"]:
            raise DataError(f"{key} must be <= {m['le']}, got {value!r}")


@dataclass(frozen=True)
class PhantomParams:
    """``phantom``: a head-like soft ellipsoid with a bright rim, bright and dark blobs, mild noise. No parameters."""

    def __post_init__(self) -> None:
        _check_bounds(self, "phantom")


@dataclass(frozen=True)
class MicrotubuleParams:
    """``microtubules``: SMLM renderings of semiflexible filaments (lengths in nm, densities per um).

    Each filament is a worm-like chain through a random point of the field, grown both ways until it leaves
    the field; localisations are drawn along it (Poisson, ``localizations_per_um``), plus uniform unspecific
    background localisations, binned into voxels and blurred by an anisotropic Gaussian PSF. An isolated
    in-focus filament peaks near 0.75; crossings saturate softly towards 1.
    """

    min_filaments: int = _p(4, "fewest filaments crossing the field", ge=1)
    max_filaments: int = _p(10, "most filaments crossing the field (>= min_filaments)", ge=1)
    persistence_length_um: float = _p(
        15.0, "stiffness: worm-like-chain persistence length in um (larger = straighter)", gt=0
    )
    max_tilt_deg: float = _p(10.0, "largest angle between a filament and the lateral plane (3D only)", ge=0, le=90)
    psf_sigma_nm: float = _p(20.0, "thickness: lateral sigma of the Gaussian PSF in nm", gt=0)
    axial_ratio: float = _p(2.5, "anisotropy: axial PSF sigma / lateral PSF sigma (3D only)", gt=0)
    localizations_per_um: float = _p(150.0, "labelling density: mean localisations per um of filament", gt=0)
    background_density: float = _p(
        20.0, "unspecific localisations per um^3 (per um^2 in 2D), uniform over the field", ge=0
    )
    gaussian_noise: float = _p(0.0, "std of additive Gaussian noise on the [0, 1] image (SMLM renders have none)", ge=0)

    def __post_init__(self) -> None:
        _check_bounds(self, "microtubules")
        if self.max_filaments < self.min_filaments:
            raise DataError(
                f"data.synthetic.max_filaments ({self.max_filaments}) must be >= data.synthetic.min_filaments "
                f"({self.min_filaments})"
            )


@dataclass(frozen=True)
class BrainParams:
    """``brain``: the MNI152 2009 T1 template (skull-stripped, from nilearn) turned into distinct subjects.

    Per volume: a MONAI random elastic deformation with rotation, scaling and translation (``Rand3DElastic``,
    ``Rand2DElastic`` for 2D), a smooth multiplicative bias field (``RandBiasField``), a gamma change
    (``RandAdjustContrast``), scaling of the 99.5th percentile of the brain to 1, Rician noise
    (``RandRicianNoise``), clipping to [0, 1]. 2D images are axial slices near the middle of the brain.
    """

    rotate_deg: float = _p(8.0, "largest rotation about each axis, degrees", ge=0, le=180)
    scale: float = _p(0.08, "largest relative change of size along each axis", ge=0, le=0.5)
    translate_mm: float = _p(4.0, "largest shift along each axis, mm", ge=0)
    elastic_mm: float = _p(
        2.5, "elastic displacement, mm: its RMS per axis is drawn in [0.5, 1.5] x this (0 = none)", ge=0
    )
    elastic_sigma_mm: float = _p(12.0, "smoothness of the elastic displacement (Gaussian sigma), mm", gt=0)
    bias: float = _p(0.2, "bias field strength (polynomial coefficients drawn in [-bias, bias])", ge=0, le=1)
    gamma: float = _p(0.25, "gamma drawn in [1 - gamma, 1 + gamma]", ge=0, le=0.9)
    rician_noise: float = _p(0.02, "largest std of the Rician noise, relative to the [0, 1] range", ge=0)
    slice_jitter_mm: float = _p(10.0, "2D only: the axial slice is drawn within +- this of the brain's middle", ge=0)

    def __post_init__(self) -> None:
        _check_bounds(self, "brain")


# Parameter names are unique across kinds (and distinct from enabled/num_train/num_val/seed/kind), so that the
# settings can hold them all flat under ``data.synthetic``.
PARAMS: dict[str, type] = {"phantom": PhantomParams, "microtubules": MicrotubuleParams, "brain": BrainParams}


def check_kind(kind: Any) -> str:
    """``kind`` when it names a built-in dataset; else a DataError listing them."""
    if not isinstance(kind, str) or kind not in PARAMS:
        raise DataError(f"unknown synthetic dataset kind {kind!r} (data.synthetic.kind); expected one of {list(KINDS)}")
    return kind


def make_params(kind: str, params: Mapping[str, Any] | Any | None = None) -> Any:
    """The parameter dataclass of ``kind`` from a mapping of overrides (or an instance, passed through).

    Args:
        kind: one of :data:`KINDS`.
        params: ``None`` (all defaults), a mapping ``{name: value}`` of some of the kind's parameters, or an
            instance of ``PARAMS[kind]``.

    Raises:
        DataError (a ValueError): unknown kind, unknown parameter name (the message lists the valid ones),
            wrong type or out-of-range value.
    """
    cls = PARAMS[check_kind(kind)]
    if params is None:
        return cls()
    if isinstance(params, cls):
        return params
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    if not isinstance(params, Mapping):
        raise DataError(f"synthetic parameters for kind {kind!r} must be a mapping, got {type(params).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise DataError(
            f"unknown parameter(s) {unknown} for synthetic kind {kind!r}; valid parameters: {names or 'none'}"
        )
    return cls(**dict(params))

