"""Evaluation: how close generated volumes are to real ones, and how well stage 1 reconstructs them.

Everything works on float32 tensors of shape ``(N, C, *spatial)`` with two or three spatial dimensions; the real
data is expected roughly in ``[0, 1]``. The metrics are defined in ``docs/evaluate.md``. The package's parts, from
the bottom up:

- :mod:`.io`: :func:`load_volume_folder` reads a folder of NIfTI files, 2D images or ``.npy`` arrays.
- :mod:`.metrics`: :func:`reconstruction_metrics` (PSNR, SSIM, MS-SSIM and L1 of paired volumes, MONAI's
  metrics), :func:`mmd`, :func:`ms_ssim_diversity`, :func:`histogram_w1`, :func:`nn_ratio` and
  :func:`projection_consistency` (the Pearson correlation of each sample's projection with its condition).
- :mod:`.c2st`: :func:`c2st_accuracy`, the classifier two-sample test, with its :class:`C2STSettings`.
- :mod:`.features`: :func:`load_feature_extractor` (a local file; nothing is downloaded) and :func:`fid`.
- :mod:`.frd`: :func:`frd`, the Fréchet Radiomics Distance through the optional ``frd-score`` package, and
  :func:`frd_missing` (why it cannot be computed here, with how to install it).
- :mod:`.report`: :func:`generation_metrics` (every generation metric of one comparison), :func:`compare_sets`
  (samples vs real, and with reconstructions also samples vs reconstructions and reconstructions vs real, plus
  counts, shapes, value ranges and settings), :func:`write_report` (JSON + Markdown + PNG grid, atomically, never
  replacing a report unasked) and :func:`summary_table`.
- :mod:`.sets`: :func:`evaluate_sets`, two sets (folders or tensors) -> the report dict, as ``evaluate --real
  --samples`` computes it (exported from the package root too).
- :mod:`.pipeline`: :func:`~.pipeline.evaluate_pipeline`, ``evaluate --config``: a trained run measured on its own
  data. It opens checkpoints through the sampler, so it is not imported here: comparing two folders needs neither.
"""

from __future__ import annotations

from ..errors import EvaluateError
from .c2st import C2STSettings, c2st_accuracy, c2st_min_count
from .features import fid, load_feature_extractor
from .frd import frd, frd_missing
from .io import load_volume_folder
from .metrics import (
    histogram_w1,
    mmd,
    ms_ssim_diversity,
    ms_ssim_settings,
    nn_ratio,
    pearson,
    projection_consistency,
    reconstruction_metrics,
    unbiased_mmd,
)
from .report import compare_sets, generation_metrics, summary_table, write_report
from .sets import evaluate_sets

__all__ = [
    "evaluate_sets",
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
    "frd",
    "frd_missing",
    "generation_metrics",
    "pearson",
    "projection_consistency",
    "compare_sets",
    "summary_table",
    "write_report",
]
