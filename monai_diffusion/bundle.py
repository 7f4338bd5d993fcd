"""MONAI bundle export: a trained run as a bundle that MONAI's own runner executes.

``monai-diffusion-export-bundle --run DIR --out BUNDLE`` writes::

    BUNDLE/configs/metadata.json    versions, the data's spacing/shape/affine/intensity window, the networks
    BUNDLE/configs/inference.json   a ConfigWorkflow: DiffusionPipeline.from_bundle -> generate -> NIfTI files
    BUNDLE/models/                  weights (safetensors, else weights-only .pt state dicts) + diffusion.json
    BUNDLE/docs/README.md           how to run it, and the run's evaluation table when the run has one

and ``python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE`` (optionally
``--output_dir``, ``--num_samples``, ``--seed``, ``--num_inference_steps``, ``--device``) writes ``sample_NNNN.nii.gz``
with the data's affine through the same sampling path as the CLI. Nothing in the bundle is pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_checkpoint, write_model_folder
from .errors import RunError
from .fileio import atomic_write_json, atomic_write_text, plain
from .settings import load_settings

BUNDLE_VERSION = "0.1.0"


def _run_files(run: Path) -> tuple[Path, Path, Path]:
    """``(stage-2 folder, its config.yaml, its best_model.pt)`` of a run folder (``<run>/diffusion/``) or of a
    stage-2 output folder itself."""
    for folder in (run / "diffusion", run):
        if (folder / "config.yaml").is_file() and (folder / "best_model.pt").is_file():
            return folder, folder / "config.yaml", folder / "best_model.pt"
    raise RunError(f"--run {run}: no stage-2 run there; expected diffusion/config.yaml and diffusion/best_model.pt "
                   "(the folder train_diffusion wrote), or those two files directly")


def inference_config(num_samples: int = 4) -> dict[str, Any]:
    """The ``configs/inference.json`` of an exported bundle: ids ``bundle_root``, ``output_dir``, ``num_samples``,
    ``seed``, ``num_inference_steps`` (null: the run's setting), ``device`` can be overridden on the command line;
    ``run`` generates and writes NIfTI samples (never replacing a file)."""
    return {
        "imports": ["$import torch", "$import monai_diffusion.pipeline"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/samples'",
        "num_samples": num_samples,
        "seed": 0,
        "num_inference_steps": None,
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "pipeline": {"_target_": "monai_diffusion.pipeline.DiffusionPipeline.from_bundle",
                     "bundle_root": "@bundle_root"},
        "samples": "$@pipeline.to(@device).generate(@num_samples, seed=@seed, "
                   "num_inference_steps=@num_inference_steps, progress=False)",
        "initialize": [],
        "run": ["$@pipeline.save(@samples, @output_dir, save_format='nifti', png=False)"],
        "finalize": [],
    }


def _metadata(ckpt: dict[str, Any], settings: Any, run: Path) -> dict[str, Any]:
    import monai
    import numpy as np

    info = ckpt.get("data_info") or {}
    latent = list(ckpt["latent_shape"])
    pixel = ckpt.get("space", "latent") == "pixel"
    channels = latent[0] if pixel else ckpt["autoencoder"]["model_args"].get("in_channels", 1)
    shape = info.get("shape") or info.get("voxel_size") or list(settings.data.voxel_size)
    ae = None if pixel else ckpt["autoencoder"]["model_args"]
    intensity = plain(settings.data.intensity)
    network = (f"{'pixel-space' if pixel else 'latent'} diffusion UNet {list(ckpt['model_args'].get('channels', []))}"
               f" ({ckpt['scheduler_args'].get('type', 'ddpm')} objective, "
               f"{ckpt['scheduler_args']['num_train_timesteps']} timesteps)")
    if ae is not None:
        kind = "VQ-VAE" if "num_embeddings" in ae else "KL autoencoder"
        network += f" on the latent ({latent}) of a {kind} {list(ae.get('channels', []))}"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported from the monai-diffusion run {run.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"monai-diffusion": "0.1.0"},
        "name": f"monai-diffusion {run.name}",
        "task": "unconditional generation of volumes" if not ckpt.get("conditioning") else "conditional generation",
        "description": f"A monai-diffusion model: {network}. Samples are on the data's [0, 1] intensity scale.",
        "authors": "monai-diffusion",
        "copyright": "see the run's data and training",
        "network_data_format": {
            "inputs": {},
            "outputs": {"pred": {"type": "image", "format": "magnitude", "modality": "generated",
                                 "num_channels": int(channels), "spatial_shape": [int(s) for s in shape],
                                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {str(i): f"channel {i}" for i in range(int(channels))}}},
        },
        "data": {
            "spacing": info.get("spacing"),
            "shape": shape,
            "affine": info.get("affine"),
            "orientation": info.get("orientation"),
            "intensity_window": intensity,
            "source": info.get("source"),
        },
        "network": {"unet": ckpt["model_args"], "autoencoder": ae, "scheduler": ckpt["scheduler_args"],
                    "scale_factor": ckpt.get("scale_factor"), "latent_shape": latent, "space": ckpt.get("space",
                                                                                                       "latent")},
    }


def _readme(meta: dict[str, Any], run: Path) -> str:
    lines = [
        f"# {meta['name']}", "",
        meta["description"], "",
        "## Run it", "",
        "```bash",
        "pip install monai-diffusion   # the package that defines the networks (this bundle holds no code)",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\",
        "    --output_dir OUT --num_samples 4 --seed 0",
        "```", "",
        "It writes `OUT/sample_NNNN.nii.gz` (numbered after files already there; nothing is replaced) with the "
        "training data's affine. `--num_inference_steps N` and `--device cpu|cuda` override the run's settings.", "",
        "## Data", "",
        f"- spacing: {meta['data']['spacing']}, shape: {meta['data']['shape']}, orientation: "
        f"{meta['data']['orientation']}",
        f"- intensity window (scaled to [0, 1]): {json.dumps(meta['data']['intensity_window'])}", "",
        "## Weights", "",
        "`models/` holds the weights as safetensors (or weights-only PyTorch state dicts) and `diffusion.json`, the "
        "architectures and the run's settings: opening them runs no code.", "",
    ]
    report = run / "evaluation.md"
    if report.is_file():
        lines += ["## Evaluation of the run", "", report.read_text().strip(), ""]
    else:
        lines += ["## Evaluation", "", "The run had no `evaluation.md` when it was exported (run `evaluate` on it).",
                  ""]
    return "\n".join(lines)


def export_bundle(run: str | Path, out: str | Path) -> list[Path]:
    """Write the MONAI bundle of a trained run (see the module's docstring) into ``out``, which must not exist or be
    empty (nothing is overwritten). Returns the files written."""
    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not run.is_dir():
        raise RunError(f"--run {run}: no such folder (expected the run folder the CLI wrote, e.g. runs/quickstart)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not empty; bundles are never overwritten (choose "
                              "another folder or remove it)")
    _, config, checkpoint = _run_files(run)
    settings = load_settings(config, check_paths=False, require_data=False)
    ckpt = load_checkpoint(checkpoint, expected_stage="diffusion")
    meta = _metadata(ckpt, settings, run)
    written = write_model_folder(ckpt, plain(settings), out / "models", use_ema=settings.sampling.use_ema)
    written.append(atomic_write_json(out / "configs" / "metadata.json", meta, sort_keys=False))
    written.append(atomic_write_json(out / "configs" / "inference.json",
                                     inference_config(settings.sampling.num_samples), sort_keys=False))
    written.append(atomic_write_text(out / "docs" / "README.md", _readme(meta, run)))
    return written
