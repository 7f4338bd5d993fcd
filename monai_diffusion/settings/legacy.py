"""The seed system's configs, folded onto this schema when a file is loaded.

* A top-level ``vqvae:`` section (the seed's ``vq_ldm_config_local.yaml``) becomes ``autoencoder.type: vq`` with
  its keys under ``autoencoder`` / ``autoencoder.vqvae`` (:func:`fold_seed_vqvae`); problems found later name
  those keys as the user wrote them (:func:`seed_names`, :func:`renamed`).
* A config naming ``diffusion.condition_channels`` but neither ``diffusion.space`` nor a stage-1 checkpoint (the
  seed's ``conditional_diffusion_config.yaml``) is a pixel-space model (:func:`seed_conditional_defaults`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .messages import show, suggest
from .schema import VQVAESettings

__all__ = ["fold_seed_vqvae", "seed_names", "renamed", "seed_conditional_defaults"]


# keys of the seed's top-level ``vqvae:`` section that land in ``autoencoder`` itself (the rest in autoencoder.vqvae)
_SEED_VQVAE_SHARED = ("spatial_dims", "in_channels", "out_channels", "training", "checkpoints", "logging")


def fold_seed_vqvae(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Map the seed system's top-level ``vqvae:`` section (``vq_ldm_config_local.yaml``) onto this schema.

    ``vqvae.{spatial_dims, in_channels, out_channels, training, checkpoints, logging}`` become the same keys of
    ``autoencoder``; every other ``vqvae.X`` becomes ``autoencoder.vqvae.X``; ``autoencoder.type`` becomes ``vq``; the
    seed's ``diffusion.checkpoints.vqvae_path`` becomes ``diffusion.checkpoints.autoencoder_path``. The seed trained its
    VQ-VAE without a discriminator, so ``autoencoder.training.adv_weight`` is 0 unless ``vqvae.training`` gives it.
    A document without these keys is returned unchanged (as a copy).

    Raises:
        ConfigError: naming each seed key that is also given under its new name, or is not a VQ-VAE key.
    """
    out: dict[str, Any] = copy.deepcopy(dict(raw)) if raw else {}
    problems: list[tuple[str, str]] = []
    ckpts = out.get("diffusion", {}).get("checkpoints") if isinstance(out.get("diffusion"), Mapping) else None
    if isinstance(ckpts, dict) and "vqvae_path" in ckpts:
        if ckpts.get("autoencoder_path") is not None:
            problems.append(("diffusion.checkpoints.vqvae_path", "is the seed's name of "
                             "diffusion.checkpoints.autoencoder_path, which is given too; keep one of them"))
        else:
            ckpts["autoencoder_path"] = ckpts.pop("vqvae_path")
    if "vqvae" in out:
        seed = out.pop("vqvae")
        seed = {} if seed is None else seed
        ae = out.get("autoencoder")
        ae = {} if ae is None else ae
        if not isinstance(seed, Mapping):
            problems.append(("vqvae", f"expected a section (a mapping of keys), got {show(seed)}"))
        elif not isinstance(ae, dict):
            problems.append(("autoencoder", f"expected a section (a mapping of keys), got {show(ae)}"))
        else:
            if ae.get("type", "vq") != "vq":
                problems.append(("autoencoder.type", f"a top-level vqvae section selects the VQ-VAE, but "
                                                     f"autoencoder.type is {ae['type']!r}; remove one of them"))
            ae["type"] = "vq"
            if ae.get("vqvae") is None:
                ae["vqvae"] = {}
            vq = ae["vqvae"] if isinstance(ae["vqvae"], dict) else None
            vq_names = [f.name for f in dataclasses.fields(VQVAESettings)]
            for key, value in seed.items():
                if key in _SEED_VQVAE_SHARED:
                    target, where = ae, f"autoencoder.{key}"
                elif key in vq_names and vq is not None:
                    target, where = vq, f"autoencoder.vqvae.{key}"
                else:
                    problems.append((f"vqvae.{key}", f"unknown key of the seed's vqvae section; "
                                                     f"{suggest(key, [*_SEED_VQVAE_SHARED, *vq_names])}"))
                    continue
                if key in target:
                    problems.append((f"vqvae.{key}", f"is given twice: here and as {where} (the top-level vqvae "
                                                     f"section maps onto it); keep one of them"))
                    continue
                target[key] = copy.deepcopy(value)
            training = ae.get("training")
            if training is None:
                training = ae["training"] = {}
            if isinstance(training, dict):
                training.setdefault("adv_weight", 0.0)
            out["autoencoder"] = ae
    if problems:
        raise ConfigError(problems=problems)
    return out


def seed_names(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """Where each key of a seed ``vqvae:`` section lands (``autoencoder.vqvae.num_channels`` ->
    ``vqvae.num_channels``), so that problems name the key as the user wrote it."""
    seed = raw.get("vqvae") if isinstance(raw, Mapping) else None
    if not isinstance(seed, Mapping):
        return {}
    return {(f"autoencoder.{k}" if k in _SEED_VQVAE_SHARED else f"autoencoder.vqvae.{k}"): f"vqvae.{k}" for k in seed}


def renamed(err: ConfigError, names: Mapping[str, str]) -> ConfigError:
    """``err`` with each problem's key given in the seed's naming where it came from a seed ``vqvae:`` section."""
    if not names:
        return err

    def rename(key: str) -> str:
        for new, old in names.items():
            if key == new or key.startswith((new + ".", new + "[")):
                return old + key[len(new):]
        return key

    return ConfigError(problems=[(rename(k), m) for k, m in err.problems], source=err.source)


def seed_conditional_defaults(d: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The seed's ``conditional_diffusion_config.yaml`` names ``diffusion.condition_channels`` but neither
    ``diffusion.space`` nor a stage-1 checkpoint: it is a pixel-space model, whose code fixed GroupNorm at 8 groups.
    Such a config gets ``space: pixel`` and (unless given) ``norm_num_groups: 8``; every other config is returned
    as it is."""
    df = d.get("diffusion") if isinstance(d, Mapping) else None
    if not isinstance(df, Mapping) or df.get("condition_channels") is None or "space" in df:
        return d
    ckpts = df.get("checkpoints")
    if isinstance(ckpts, Mapping) and ckpts.get("autoencoder_path") is not None:
        return d
    return {**d, "diffusion": {"space": "pixel", "norm_num_groups": 8, **df}}
