"""Helpers shared by the test files: paths of the shipped configs, the argv of a CLI entry point, the one-line error
check, and ONE builder of the tiny two-stage run (a few seconds of CPU work) with the variants that several files use.

Test files import the plain functions with ``from conftest import ...``. That needs no ``sys.path`` edit: pytest's
default import mode puts this folder (``tests/`` has no ``__init__.py``) at the front of ``sys.path`` before it imports
this file and the test files, and ``sys.modules["conftest"]`` is this very module. Plain functions rather than
fixtures, because the helpers take arguments and are called from other helpers and at module level; the one shared
trained run is a fixture (``autoencoder_run``), so that only the modules that ask for it train it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "monai_diffusion" / "config"
QUICKSTART = CONFIGS / "examples" / "quickstart.yaml"


def cli_args(config: Path, sets: Sequence[str], *flags: str) -> list[str]:
    """The argv of a CLI entry point: ``--config CONFIG [FLAGS] --set S ...`` for these overrides."""
    out = ["--config", str(config), *flags]
    for s in sets:
        out += ["--set", s]
    return out


def error_line(capsys, code: int) -> str:
    """The command's exit code is 2 and stderr holds exactly one line, starting with 'error: '."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ the tiny run
def _tiny_base(root: Path) -> dict[str, str]:
    """KEY -> VALUE of the tiny run: 16^3 phantoms (4 train, 2 val), a KL autoencoder [4, 8] with factor 4 (latent
    2 x 4^3), a UNet [8, 8], one autoencoder epoch, batch 2, every output under ``root``, on the CPU in fp32."""
    return {
        "data.synthetic": "{enabled: true, num_train: 4, num_val: 2, seed: 0}",
        "data.voxel_size": "[16, 16, 16]",
        "data.num_workers": "0",
        "autoencoder.num_channels": "[4, 8]",
        "autoencoder.downsample_factors": "[4]",
        "autoencoder.attention_levels": "[false, false]",
        "autoencoder.norm_num_groups": "4",
        "autoencoder.latent_channels": "2",
        "autoencoder.training.n_epochs": "1",
        "autoencoder.training.batch_size": "2",
        "autoencoder.training.discriminator": "{num_layers_d: 1, num_channels: 4}",
        "autoencoder.checkpoints.output_dir": f"{root / 'ae'}",
        "diffusion.in_channels": "2",
        "diffusion.out_channels": "2",
        "diffusion.num_channels": "[8, 8]",
        "diffusion.attention_levels": "[false, true]",
        "diffusion.num_head_channels": "8",
        "diffusion.norm_num_groups": "4",
        "diffusion.training.batch_size": "2",
        "diffusion.checkpoints.autoencoder_path": f"{root / 'ae' / 'best_model.pt'}",
        "diffusion.checkpoints.output_dir": f"{root / 'dm'}",
        "sampling.output_dir": f"{root / 'samples'}",
        "device.use_cuda": "false",
        "device.mixed_precision": "false",
    }


def tiny_overrides(root: Path, *changes: str, leave: Iterable[str] = ()) -> list[str]:
    """The ``--set`` list of the tiny run under ``root``, changed by ``changes`` and without the keys in ``leave``.

    ``changes`` are ``KEY=VALUE`` overrides; one whose key the list already holds replaces that entry, the others
    are added, and every change goes after the entries it does not replace. That is what ``--set`` does with a
    later override (the last one wins), so a file's settings are the same as if its changes were appended, and each
    key appears once. A change without ``=`` is passed on as it is (tests of the error it causes use that).
    ``leave`` names keys of the tiny run to drop, so that the config file's own value stays in force.
    """
    base = _tiny_base(root)
    unknown = [key for key in leave if key not in base]
    if unknown:
        raise KeyError(f"leave={unknown}: not keys of the tiny run; expected some of {sorted(base)}")
    entries = {key: f"{key}={value}" for key, value in base.items() if key not in set(leave)}
    for item in changes:
        key = item.split("=", 1)[0] if "=" in item else item
        entries.pop(key, None)
        entries[key] = item
    return list(entries.values())


def tiny_any_config(root: Path, *extra: str) -> list[str]:
    """Overrides that shrink any shipped config to a few seconds of CPU work: its data sources off and the phantoms
    on, a three-level autoencoder [4, 8, 8] with the config's own factors, two epochs (the adversarial path on from
    the second), logging every step; the config keeps its diffusion outputs, sampling and precision."""
    return tiny_overrides(
        root,
        "data.train_data_dir=null",
        "data.val_data_dir=null",
        "data.datalist=null",
        "data.synthetic={enabled: true, num_train: 4, num_val: 2, seed: 0}",
        "data.crop_mode=resize",
        "data.cache_rate=1.0",
        "data.cache_dir=null",
        "autoencoder.num_channels=[4, 8, 8]",
        "autoencoder.training.n_epochs=2",
        "autoencoder.training.autoencoder_warm_up_n_epochs=1",
        "autoencoder.training.adv_weight=0.01",  # the adversarial path on from epoch 2
        "autoencoder.training.use_perceptual_loss=false",
        "autoencoder.training.discriminator={num_layers_d: 2, num_channels: 4}",
        "autoencoder.training.gradient_accumulation_steps=1",
        "autoencoder.checkpoints.resume_from=null",
        "autoencoder.logging.log_dir=null",
        "autoencoder.logging.log_interval=1",
        *extra,
        leave=("autoencoder.downsample_factors", "autoencoder.attention_levels", "diffusion.training.batch_size",
               "diffusion.checkpoints.autoencoder_path", "diffusion.checkpoints.output_dir", "sampling.output_dir",
               "device.mixed_precision"),
    )


def tiny_run_args(root: Path, *extra: str, config: Path = QUICKSTART, size: str = "[16, 16, 16]") -> list[str]:
    """The argv of a tiny train -> train -> sample run of ``config``: volumes of ``size`` (2 train, 1 val), a KL
    autoencoder [4, 4] with factor 2, a UNet [4, 4] with attention on its second level, 20 timesteps, one epoch
    each and one sample during training, 2 samples of 2 steps."""
    return cli_args(config, tiny_overrides(
        root,
        "data.synthetic={enabled: true, num_train: 2, num_val: 1, seed: 0}",
        f"data.voxel_size={size}",
        "autoencoder.num_channels=[4, 4]",
        "autoencoder.downsample_factors=[2]",
        "diffusion.num_channels=[4, 4]",
        "diffusion.num_head_channels=4",
        "diffusion.scheduler.num_train_timesteps=20",
        "diffusion.training.n_epochs=1",
        "diffusion.training.num_samples_to_generate=1",
        "sampling.num_inference_steps=2",
        "sampling.num_samples=2",
        "sampling.batch_size=2",
        *extra,
    ))


def tiny_factor4(root: Path, *extra: str) -> list[str]:
    """Both stages on 16^3 volumes: autoencoder [4, 8] (factor 4, latent 2 x 4^3), UNet [8, 8]; 50 timesteps, no
    warm-up, no EMA, cached latents; the config keeps its sampling output folder."""
    return tiny_overrides(
        root,
        "autoencoder.training.discriminator={num_layers_d: 2, num_channels: 4}",
        "diffusion.scheduler.num_train_timesteps=50",
        "diffusion.training.scale_factor_batches=1",
        "diffusion.training.lr_warmup_steps=0",
        "diffusion.training.ema_decay=null",
        "diffusion.training.cache_latents=true",
        *extra,
        leave=("sampling.output_dir",),
    )


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory) -> Path:
    """A folder whose ``ae/`` holds a stage-1 run of ``tiny_factor4`` (trained once per test module that asks)."""
    from monai_diffusion.settings import load_settings
    from monai_diffusion.stage1 import train_autoencoder

    root = tmp_path_factory.mktemp("ae_run")
    train_autoencoder(load_settings(QUICKSTART, tiny_factor4(root)))
    return root
