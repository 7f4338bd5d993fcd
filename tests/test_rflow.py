"""Rectified flow (diffusion.scheduler.type: rflow): training, exact resume, sampling, guidance, and the refusal of
samplers that do not match the trained objective."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.cli import generate_samples_main, train_autoencoder_main, train_diffusion_main
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.conditioning import build_scheduler, resolve_sampler, set_sampling_steps
from monai_diffusion.sampling import sample_latents
from monai_diffusion.settings import ConfigError, settings_from_dict

from conftest import QUICKSTART, cli_args, tiny_overrides


def args(root: Path, *extra: str) -> list[str]:
    """The tiny run with a rectified-flow scheduler: autoencoder [4, 4] with factor 4, UNet [8, 8], two diffusion
    epochs with a sample after each, sampling of 2 samples in 4 steps from seed 0."""
    sets = tiny_overrides(
        root,
        "autoencoder.num_channels=[4, 4]",
        "diffusion.scheduler.type=rflow",
        "diffusion.training.n_epochs=2",
        "diffusion.training.generate_samples_interval=1",
        "diffusion.training.num_samples_to_generate=1",
        "sampling.num_inference_steps=4",
        "sampling.num_samples=2",
        "sampling.batch_size=2",
        "sampling.seed=0",
        *extra,
    )
    return cli_args(QUICKSTART, sets)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rflow")
    assert train_autoencoder_main(args(root)) == 0
    return root


def _unet_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, "diffusion")["state_dict"]["unet"]


def test_rflow_trains_resumes_exactly_and_samples(autoencoder, tmp_path, capsys):
    root = autoencoder
    whole = args(root, f"diffusion.checkpoints.output_dir={tmp_path / 'whole'}")
    assert train_diffusion_main(whole) == 0
    ckpt = load_checkpoint(tmp_path / "whole" / "latest_checkpoint.pt", "diffusion")
    assert ckpt["scheduler_args"]["type"] == "rflow" and "prediction_type" not in ckpt["scheduler_args"]
    assert all(np.isfinite(h["train_mse"]) for h in ckpt["history"])
    # stopped after epoch 1 and resumed: the same weights as the uninterrupted run
    part = tmp_path / "part"
    assert train_diffusion_main(args(root, f"diffusion.checkpoints.output_dir={part}",
                                     "diffusion.training.n_epochs=1")) == 0
    assert train_diffusion_main(args(root, f"diffusion.checkpoints.output_dir={part}",
                                     f"diffusion.checkpoints.resume_from={part / 'latest_checkpoint.pt'}")) == 0
    a, b = _unet_weights(tmp_path / "whole" / "latest_checkpoint.pt"), _unet_weights(part / "latest_checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # sampling reads the objective from the checkpoint: the default sampler is rflow
    capsys.readouterr()
    sample = args(root, f"sampling.checkpoint={tmp_path / 'whole' / 'latest_checkpoint.pt'}")
    assert generate_samples_main(sample) == 0
    assert "with RFLOW (4 steps)" in capsys.readouterr().out
    volumes = sorted((root / "samples").glob("*.nii.gz"))
    assert len(volumes) == 2 and np.isfinite(nib.load(volumes[0]).get_fdata()).all()
    # a DDPM sampler on a rectified-flow model is refused, naming both
    assert generate_samples_main(sample + ["--set", "sampling.scheduler=ddim",
                                           "--set", "diffusion.scheduler.type=ddpm"]) == 2
    err = capsys.readouterr().err
    assert "sampling.scheduler=ddim cannot sample a model trained with diffusion.scheduler.type=rflow" in err


def test_invalid_pairs_are_refused_by_the_settings():
    with pytest.raises(ConfigError, match="sampling.scheduler: ddim cannot sample a model trained with "
                                          "diffusion.scheduler.type=rflow"):
        settings_from_dict({"diffusion": {"scheduler": {"type": "rflow"}}, "sampling": {"scheduler": "ddim"}},
                           check_paths=False)
    with pytest.raises(ConfigError, match="rflow cannot sample a model trained with diffusion.scheduler.type=ddpm"):
        settings_from_dict({"sampling": {"scheduler": "rflow"}}, check_paths=False)
    assert resolve_sampler({"type": "rflow", "num_train_timesteps": 10}, "auto") == "rflow"
    assert resolve_sampler({"num_train_timesteps": 10, "schedule": "linear_beta"}, "auto") == "ddim"  # older ckpt


def test_rflow_sampling_follows_the_velocity_and_guidance_changes_it():
    """With a 'network' that predicts the exact velocity towards a fixed target, sampling lands on the target; with
    a class condition, classifier-free guidance moves the result."""
    from monai_diffusion.conditioning import Conditioner

    target = torch.full((1, 1, 8, 8, 8), 0.7)
    args_ = {"type": "rflow", "num_train_timesteps": 1000, "use_timestep_transform": True, "spatial_dims": 3}

    class Exact(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            # x_t = (1 - s) x0 + s noise, s = t / T; velocity x0 - noise = (x0 - x_t) / s
            s = (t.float() / 1000).view(-1, 1, 1, 1, 1).clamp(min=1e-3)
            v = (target - x) / s
            if class_labels is not None:
                v = v + (class_labels.float().view(-1, 1, 1, 1, 1) - 1.0)  # class 1: exact, null class 2: off
            return v

    sched = build_scheduler(args_, "rflow")
    set_sampling_steps(sched, 8, (8, 8, 8))
    noise = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_latents(Exact(), sched, noise, progress=False)
    torch.testing.assert_close(out, target, atol=1e-3, rtol=0)
    cond = Conditioner(class_key="c", num_classes=2)
    labels = {"class_labels": torch.tensor([1])}
    plain = sample_latents(Exact(), sched, noise, labels, cond, 1.0, progress=False)
    guided = sample_latents(Exact(), sched, noise, labels, cond, 3.0, progress=False)
    assert not torch.allclose(plain, guided)
