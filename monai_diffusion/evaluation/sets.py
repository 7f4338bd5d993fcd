"""``evaluate_sets``: two (or three) sets of volumes -> the report dictionary, as ``evaluate --real --samples``
computes it, for Python callers (folders or tensors)."""

from __future__ import annotations

import os
from typing import Any

import torch

from .c2st import C2STSettings
from .io import load_volume_folder
from .report import compare_sets


def _volumes(value: Any, what: str, label: str) -> tuple[torch.Tensor, dict[str, Any] | None, str]:
    if isinstance(value, (str, os.PathLike)):
        x, meta = load_volume_folder(value, what=what)
        return x, meta, f"{what} folder {str(value)!r}"
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor).float(), None, label
    raise ValueError(f"{label}: expected a folder or a tensor (N, C, *spatial), got {type(value).__name__}")


def evaluate_sets(
    real: str | os.PathLike | torch.Tensor,
    samples: str | os.PathLike | torch.Tensor,
    recon: str | os.PathLike | torch.Tensor | None = None,
    *,
    seed: int = 0,
    c2st_epochs: int | None = None,
    fid_weights: str | os.PathLike | None = None,
    frd: bool | None = None,
) -> dict[str, Any]:
    """Measure generated volumes against real ones as the ``evaluate`` command does with ``--real``/``--samples``
    (and ``--recon``): the same metrics, the same report dictionary (``docs/evaluate.md``); nothing is written
    (pass the result to :func:`~.report.write_report` for the files).

    Args:
        real: a folder of volumes (NIfTI, 2D images or ``.npy``, as ``evaluate`` reads them) or a tensor
            ``(N, C, *spatial)`` on the [0, 1] scale.
        samples: the generated volumes, the same way (e.g. what ``DiffusionPipeline.generate`` returns).
        recon: the autoencoder's reconstructions of ``real``, in the same order (optional).
        seed: seeds C2ST and the choice of diversity pairs (``--seed``).
        c2st_epochs: C2ST training epochs (``--c2st-epochs``; 0 skips C2ST; None: the default).
        fid_weights: a local feature-extractor file for FID (``--fid-weights``).
        frd: the Fréchet Radiomics Distance: None computes it when ``frd-score`` is installed, True requires it,
            False skips it (``--no-frd``).
    """
    r, real_meta, real_name = _volumes(real, "real", "real")
    s, samples_meta, samples_name = _volumes(samples, "samples", "samples")
    meta = {k: v for k, v in (("real", real_meta), ("samples", samples_meta)) if v is not None}
    names = {"real": real_name, "samples": samples_name}
    c = None
    if recon is not None:
        c, recon_meta, names["recon"] = _volumes(recon, "reconstructions", "recon")
        if recon_meta is not None:
            meta["recon"] = recon_meta
    c2st = C2STSettings() if c2st_epochs is None else C2STSettings(epochs=c2st_epochs)
    return compare_sets(r, s, recon=c, seed=seed, c2st=c2st, fid_weights=fid_weights, names=names, meta=meta or None,
                        frd=frd)
