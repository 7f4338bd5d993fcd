"""The Fréchet Radiomics Distance (FRD) of two sets of volumes, through the optional ``frd-score`` package.

FRD describes every volume by a few hundred radiomics features (first-order intensity statistics and textures of
the volume and of its Laplacian-of-Gaussian and wavelet-filtered copies, computed by pyradiomics), z-scores them
with the reference set's statistics, and takes the Fréchet distance between the two sets' Gaussians. No network and
no pretrained weights are involved, so nothing is downloaded. ``frd-score``'s version ``v1`` (Konz, Osuala et al.,
Medical Image Analysis 2026) is used with its default settings; its value is ``ln(d²)``, the natural log of the
squared Fréchet distance. Reading it is explained in ``docs/evaluate.md``.

``frd-score`` reads images from files, so each channel of each volume is written to a temporary NIfTI file with
1-unit voxels and the package is given the two lists of files.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EvaluateError

FRD_VERSION = "v1"
# pyradiomics 3.0.1 is the release that builds from PyPI on Python >= 3.10 (with numpy present and no build
# isolation); the README's install section gives the order
FRD_INSTALL = ('pip install numpy versioneer wheel && pip install --no-build-isolation pyradiomics==3.0.1 && '
               'pip install -e ".[frd]"')


def frd_missing() -> str | None:
    """``None`` when FRD can be computed (``frd_score`` and pyradiomics import), else why not, with how to install."""
    try:
        import frd_score  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name or 'frd_score'} is missing: {FRD_INSTALL})"
    try:
        import radiomics  # noqa: F401
    except ImportError:
        return f"not installed (pyradiomics is missing: {FRD_INSTALL})"
    return None


def frd_versions() -> dict[str, str]:
    """The versions of ``frd-score`` and pyradiomics in use (FRD is installed)."""
    import frd_score
    import radiomics

    return {"frd_score": str(frd_score.__version__), "pyradiomics": str(radiomics.__version__)}


def default_workers() -> int:
    """Processes for feature extraction: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _write(x: torch.Tensor, channel: int, folder: Path, prefix: str) -> list[str]:
    import SimpleITK as sitk

    files = []
    for i in range(x.shape[0]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(x[i, channel].detach().cpu().numpy(), dtype=np.float32))
        path = folder / f"{prefix}_{i:05d}.nii.gz"
        sitk.WriteImage(image, str(path))
        files.append(str(path))
    return files


def frd(reference: torch.Tensor, candidates: torch.Tensor, *, workers: int | None = None) -> dict[str, Any]:
    """FRD (``frd-score`` v1) of ``candidates`` against ``reference``; the reference's features set the z-scores.

    Each channel is measured on its own; with several channels ``value`` is their mean.

    Args:
        reference: ``(N, C, *spatial)``, 2 or 3 spatial dims, at least 2 volumes (the real set).
        candidates: the set judged, same ``(C, *spatial)``, at least 2 volumes.
        workers: processes extracting features (default :func:`default_workers`).

    Returns:
        ``{"value": ln(d²), "squared_distance": d², "per_channel": [ln(d²) per channel], "seconds": ...}``; ``value``
        is ``-inf`` where ``d²`` is 0 (identical sets).

    Raises:
        EvaluateError: FRD is not installed, or fewer than 2 volumes, or the shapes differ.
    """
    missing = frd_missing()
    if missing is not None:
        raise EvaluateError(f"FRD is {missing}")
    for name, x in (("reference", reference), ("candidates", candidates)):
        if x.ndim not in (4, 5) or x.shape[0] < 2:
            raise EvaluateError(f"FRD: {name} must be (N, C, *spatial) with N >= 2, got shape {tuple(x.shape)}")
    if tuple(reference.shape[1:]) != tuple(candidates.shape[1:]):
        raise EvaluateError(f"FRD: reference {list(reference.shape[1:])} and candidates "
                            f"{list(candidates.shape[1:])} differ in (C, *spatial)")
    import frd_score

    started = time.perf_counter()
    per_channel = []
    with tempfile.TemporaryDirectory(prefix="monai_diffusion_frd_") as tmp:
        folder = Path(tmp)
        for c in range(reference.shape[1]):
            ref_files = _write(reference, c, folder, f"ref_c{c}")
            cand_files = _write(candidates, c, folder, f"cand_c{c}")
            # frd_score prints its result; the report carries it instead
            with contextlib.redirect_stdout(io.StringIO()):
                value = frd_score.compute_frd([ref_files, cand_files], frd_version=FRD_VERSION,
                                              num_workers=workers or default_workers())
            per_channel.append(float(value))
    value = sum(per_channel) / len(per_channel)
    return {
        "value": value,
        "squared_distance": sum(math.exp(v) for v in per_channel) / len(per_channel),
        "per_channel": per_channel,
        "seconds": round(time.perf_counter() - started, 2),
    }
