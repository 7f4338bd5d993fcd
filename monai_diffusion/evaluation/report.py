"""The evaluation report: :func:`compare_sets` builds it (every metric of samples against real volumes, and with
reconstructions against those too), :func:`write_report` writes it as JSON, Markdown and a PNG grid of mid-slices
(:func:`monai_diffusion.pictures.picture_grid`), and :func:`summary_table` is its headline table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import EvaluateError
from ..fileio import atomic_write_bytes, plain
from ..pictures import picture_grid, png_bytes
from .c2st import C2ST_SIZE, C2STSettings, _check_c2st_counts, c2st_accuracy
from .features import fid, load_feature_extractor
from .frd import FRD_VERSION, default_workers, frd_missing, frd_versions
from .frd import frd as frd_metric
from .metrics import (
    MAX_PAIRS,
    MMD_SIZE,
    _check_same_shape,
    _check_volumes,
    histogram_w1,
    ms_ssim_diversity,
    ms_ssim_settings,
    mmd,
    nn_ratio,
    reconstruction_metrics,
)

REPORT_VERSION = 1


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
    frd: bool = False,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """All generation metrics of ``candidates`` against ``reference``: ``mmd``, ``ms_ssim_diversity``,
    ``ms_ssim_diversity_real``, ``histogram_w1``, ``nn_ratio``, ``nn_ratio_min``, ``nn_ratio_details``,
    ``c2st_accuracy``, ``c2st``, ``fid`` when a feature extractor is given, and ``frd`` with ``frd_details`` when
    ``frd`` is true (defined in ``docs/evaluate.md``).

    Args:
        reference: the reference set (real volumes, or their reconstructions).
        candidates: the set judged (samples, or reconstructions).
        seed: seeds C2ST and the choice of diversity pairs.
        data_range: intensity range for MS-SSIM (default: the reference's max - min).
        c2st: C2ST settings; ``epochs == 0`` skips the test (``c2st_accuracy`` is then ``None``).
        fid_extractor: feature network for ``fid``; without it ``fid`` is left out.
        frd: compute the Fréchet Radiomics Distance (:func:`~.frd.frd`; needs the optional ``frd-score``).
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
    if frd:
        details = frd_metric(reference, candidates)
        out["frd"] = details.pop("value")
        out["frd_details"] = details
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
    frd: bool | None = None,
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
        fid_weights: a local feature-extractor file for ``fid`` (see :func:`~.features.load_feature_extractor`).
        names: human labels of the sets for messages, e.g. folders: keys ``"real"``, ``"samples"``, ``"recon"``.
        meta: per-set metadata from :func:`~.io.load_volume_folder` (keys ``"real"``, ``"samples"``, ``"recon"``).
        frd: the Fréchet Radiomics Distance of samples vs real and reconstructions vs real: ``None`` computes it
            when ``frd-score`` is installed (else ``settings.frd`` says how to install it), ``True`` requires it,
            ``False`` skips it.

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
    missing = frd_missing() if frd is not False else None
    if frd is True and missing is not None:
        raise EvaluateError(f"FRD was asked for but is {missing}")
    use_frd = frd is not False and missing is None
    if use_frd:
        frd_setting: Any = {"version": FRD_VERSION, **frd_versions(), "workers": default_workers()}
    else:
        frd_setting = "skipped" if frd is False else missing

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
            "frd": frd_setting,
        },
        "real": _set_info(real, meta.get("real")),
        "samples": {**_set_info(samples, meta.get("samples")), **_value_range(samples, lo, hi)},
    }
    steps = ["samples vs real"] + (["samples vs recon", "recon vs real"] if recon is not None else [])
    progress = tqdm(steps, desc="evaluate", leave=False)
    common = dict(seed=seed, data_range=data_range, c2st=cfg, fid_extractor=extractor)
    progress.set_postfix_str(steps[0])
    report["samples_vs_real"] = generation_metrics(
        real, samples, names={"real": label["real"], "samples": label["samples"]}, frd=use_frd, **common
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
        block = generation_metrics(real, recon, names={"real": label["real"], "samples": label["recon"]},
                                   frd=use_frd, **common)
        block["reconstruction"] = reconstruction_metrics(real, recon, data_range=data_range)
        report["recon_vs_real"] = block
        progress.update()
    progress.close()
    if not use_frd:  # the table's frd row says n/a; settings.frd says why
        for key in ("samples_vs_real", "recon_vs_real"):
            if key in report:
                report[key]["frd"] = None
    return report


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
    "frd",
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


def frd_line(report: Mapping[str, Any]) -> str:
    """What the report's FRD is: its version and packages, or why it was not computed."""
    setting = report.get("settings", {}).get("frd")
    if isinstance(setting, Mapping):
        return (f"frd-score {setting.get('frd_score')} ({setting.get('version')}, pyradiomics "
                f"{setting.get('pyradiomics')}): ln of the squared Fréchet distance of radiomics features, lower is "
                "closer; compare only within one dataset and volume size")
    return str(setting) if setting else "n/a"


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
    lines.append(f"- FRD: {frd_line(report)}")
    lines += ["", summary_table(report), "", "Definitions of every key: `monai_diffusion/docs/evaluate.md`."]
    if png_name:
        lines += ["", f"![real, reconstructed and generated mid-slices]({png_name})"]
    return "\n".join(lines) + "\n"


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
        atomic_write_bytes(targets[2], png_bytes(grid))
        written.append(targets[2])
    text = json.dumps(plain(report, json=True), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    written.append(path)
    atomic_write_bytes(targets[1], _markdown(report, targets[2].name if rows else None).encode("utf-8"))
    written.append(targets[1])
    return written
