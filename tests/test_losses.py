"""Reconstruction losses and input corruption (monai_diffusion.losses), their settings, and their wiring into both
stages: hand-computed values, corruption statistics, denoising stage 1, stage 2 input noise, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generative.networks.nets import AutoencoderKL
from monai_diffusion import losses, stage1, stage2
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.losses import ReconstructionLoss, build_reconstruction_loss, corrupt, weighted_reconstruction_loss
from monai_diffusion.settings import ConfigError, CorruptionSettings, load_settings, settings_from_dict
from monai_diffusion.stage1 import train_autoencoder
from monai_diffusion.stage2 import train_diffusion

from conftest import QUICKSTART, tiny_overrides

SYNTH = {"data": {"synthetic": {"enabled": True}}}


def vol(*values: float) -> torch.Tensor:
    """Values as a (1, 1, n, 1, 1) volume."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1, 1)


def loss_settings(kind: str, **section):
    raw = {"reconstruction_loss_type": kind}
    if section:
        raw[kind] = section
    d = {**SYNTH, "autoencoder": {"training": {"loss": raw}}}
    return settings_from_dict(d, check_paths=False).autoencoder.training.loss


# ----------------------------------------------------------------------------------------------- known values
def test_l1_and_mse_on_known_values_and_l1_is_todays_loss():
    recon, target = vol(0.0, 0.5), vol(1.0, 0.0)
    loss, logs = build_reconstruction_loss(loss_settings("l1"))(recon, target)
    assert loss.item() == pytest.approx((1.0 + 0.5) / 2) and logs == {"l1": pytest.approx(0.75)}
    loss, logs = build_reconstruction_loss(loss_settings("mse"))(recon, target)
    assert loss.item() == pytest.approx((1.0 + 0.25) / 2) and list(logs) == ["mse"]
    # the default is bit for bit what stage 1 computed before the losses module
    x, y = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.rand(2, 1, 16, 16, 16)
    assert torch.equal(build_reconstruction_loss(loss_settings("l1"))(x, y)[0], F.l1_loss(x, y))


def test_weighted_loss_on_two_voxels():
    # voxel 0 is foreground (target 0.5 > 0.1), voxel 1 background; errors 0.25 and 0.5
    recon, target = vol(0.25, 0.5), vol(0.5, 0.0)
    s = loss_settings("weighted", foreground_weight=20.0, background_weight=1.0, threshold=0.1)
    loss, logs = build_reconstruction_loss(s)(recon, target)
    assert loss.item() == pytest.approx((20 * 0.25 + 1 * 0.5) / 2)
    assert logs == {"recon": pytest.approx(2.75), "fg_l1": pytest.approx(0.25), "bg_l1": pytest.approx(0.5),
                    "fg_fraction": pytest.approx(0.5)}
    s = loss_settings("weighted", loss_type="mse", foreground_weight=4.0, background_weight=0.5, threshold=0.1)
    loss, logs = build_reconstruction_loss(s)(recon, target)
    assert loss.item() == pytest.approx((4 * 0.0625 + 0.5 * 0.25) / 2) and "fg_mse" in logs
    # the TARGET decides: a target exactly at the threshold is background, whatever the reconstruction
    loss, _ = weighted_reconstruction_loss(vol(1.0), vol(0.1), "l1", 20.0, 1.0, 0.1)
    assert loss.item() == pytest.approx(0.9)
    # no foreground at all: the foreground diagnostic is 0, not NaN
    _, logs = weighted_reconstruction_loss(vol(0.2, 0.0), vol(0.0, 0.0))
    assert logs["fg_l1"].item() == 0 and logs["bg_l1"].item() == pytest.approx(0.1)


def test_weighted_loss_has_foreground_gradients_weighted():
    recon = vol(0.0, 0.0).requires_grad_(True)
    weighted_reconstruction_loss(recon, vol(1.0, 0.5), "mse", 10.0, 1.0, 0.7)[0].backward()
    # d/dr mean(w (r - t)^2) = w * 2 (r - t) / n
    assert recon.grad.flatten().tolist() == pytest.approx([10 * 2 * -1.0 / 2, 1 * 2 * -0.5 / 2])


def test_dice_loss_on_known_cases():
    dice = build_reconstruction_loss(loss_settings("dice", smooth=1e-5))
    mask = vol(1, 1, 0, 0, 0, 0, 0, 0)
    assert dice(mask, mask)[0].item() < 1e-4
    assert dice(mask, vol(0, 0, 1, 1, 0, 0, 0, 0))[0].item() > 1 - 1e-4
    # soft values: 1 - (2 sum(x y) + s) / (sum(x) + sum(y) + s) = 1 - 1.25 / 2.25
    loss, logs = dice(vol(0.5, 0.25, 0, 0), vol(1.0, 0.5, 0, 0))
    assert loss.item() == pytest.approx(1 - 1.25 / 2.25, abs=1e-5) and list(logs) == ["dice"]
    # one value per volume, averaged over the batch: identical + disjoint -> 0.5
    pair = dice(torch.cat([mask, mask]), torch.cat([mask, vol(0, 0, 1, 1, 0, 0, 0, 0)]))[0]
    assert pair.item() == pytest.approx(0.5, abs=1e-4)
    # empty target and empty reconstruction: Dice 1 thanks to the smoothing term
    assert dice(vol(0, 0), vol(0, 0))[0].item() == pytest.approx(0.0)
    # sigmoid first: sigmoid(0) = 0.5 everywhere against 8 ones -> 1 - 2 * 4 / (4 + 8)
    sig = build_reconstruction_loss(loss_settings("dice", sigmoid=True))
    assert sig(torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2))[0].item() == pytest.approx(1 / 3, abs=1e-5)


def test_combined_is_the_weighted_sum_of_its_parts():
    g = torch.Generator().manual_seed(1)
    recon, target = torch.rand(2, 1, 16, 16, 16, generator=g), (torch.rand(2, 1, 16, 16, 16, generator=g) > 0.9).float()
    s = loss_settings("combined", dice_weight=0.5, recon_weight=2.0, recon_loss_type="mse", foreground_weight=30.0,
                      background_weight=0.5, threshold=0.2, dice_smooth=1e-4)
    loss, logs = build_reconstruction_loss(s)(recon, target)
    dice = ReconstructionLoss("dice", dice_smooth=1e-4)(recon, target)[0]
    weighted = weighted_reconstruction_loss(recon, target, "mse", 30.0, 0.5, 0.2)[0]
    assert loss.item() == pytest.approx(0.5 * dice.item() + 2.0 * weighted.item(), rel=1e-6)
    assert logs["recon"] == pytest.approx(loss.item()) and logs["dice"] == pytest.approx(dice.item())
    assert logs["weighted"] == pytest.approx(weighted.item()) and {"fg_mse", "bg_mse", "fg_fraction"} <= set(logs)


def test_loss_arguments_are_checked():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        ReconstructionLoss("huber")
    with pytest.raises(ValueError, match="same shape"):
        ReconstructionLoss("l1")(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 2))
    with pytest.raises(ValueError, match="foreground_weight must be > 0"):
        weighted_reconstruction_loss(vol(0.0), vol(0.0), foreground_weight=0.0)


# --------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "raw, key",
    [
        ({"autoencoder": {"training": {"loss": {"reconstruction_loss_type": "bce"}}}},
         "autoencoder.training.loss.reconstruction_loss_type"),
        ({"autoencoder": {"training": {"loss": {"weighted": {"foreground_weight": 0}}}}},
         "autoencoder.training.loss.weighted.foreground_weight"),
        ({"autoencoder": {"training": {"loss": {"weighted": {"loss_type": "huber"}}}}},
         "autoencoder.training.loss.weighted.loss_type"),
        ({"autoencoder": {"training": {"loss": {"weighted": {"threshold": 1.5}}}}},
         "autoencoder.training.loss.weighted.threshold"),
        ({"autoencoder": {"training": {"loss": {"dice": {"smooth": 0}}}}}, "autoencoder.training.loss.dice.smooth"),
        ({"autoencoder": {"training": {"loss": {"combined": {"dice_weight": 0, "recon_weight": 0}}}}},
         "autoencoder.training.loss.combined.dice_weight"),
        ({"autoencoder": {"training": {"loss": {"combined": {"background_weight": -1}}}}},
         "autoencoder.training.loss.combined.background_weight"),
        ({"autoencoder": {"training": {"denoising": {"dropout_prob": 1.0}}}},
         "autoencoder.training.denoising.dropout_prob"),
        ({"autoencoder": {"training": {"denoising": {"noise_std": -0.1}}}}, "autoencoder.training.denoising.noise_std"),
        ({"autoencoder": {"training": {"denoising": {"noise_type": "salt"}}}},
         "autoencoder.training.denoising.noise_type"),
        ({"diffusion": {"training": {"input_noise": {"dropout_prob": 1.0}}}},
         "diffusion.training.input_noise.dropout_prob"),
    ],
)
def test_bad_values_name_their_key(raw, key):
    with pytest.raises(ConfigError) as info:
        settings_from_dict({**SYNTH, **raw}, check_paths=False)
    assert info.value.key == key and key in str(info.value)


def test_input_noise_with_cached_latents_is_refused_naming_both_keys_and_the_fix():
    raw = {**SYNTH, "diffusion": {"training": {"cache_latents": True, "input_noise": {"enabled": True}}}}
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw, check_paths=False)
    message = str(info.value)
    assert info.value.key == "diffusion.training.input_noise.enabled"
    assert "diffusion.training.cache_latents" in message and "--set diffusion.training.cache_latents=false" in message
    raw["diffusion"]["training"]["cache_latents"] = False
    assert settings_from_dict(raw, check_paths=False).diffusion.training.input_noise.enabled


def test_seed_style_loss_section_is_read():
    """The seed's ldm_config_local.yaml loss and denoising sections, as written there."""
    raw = {**SYNTH, "autoencoder": {"training": {
        "loss": {"reconstruction_loss_type": "combined",
                 "weighted": {"loss_type": "l1", "foreground_weight": 100.0, "background_weight": 1.0, "threshold": 0.05},
                 "dice": {"smooth": "1.0e-5", "sigmoid": False},
                 "combined": {"dice_weight": 0.5, "recon_weight": 1.0, "recon_loss_type": "l1",
                              "foreground_weight": 100.0, "background_weight": 0.5, "threshold": 0.05,
                              "dice_smooth": 1.0e-5}},
        "denoising": {"enabled": False, "noise_type": "mixed", "noise_std": 0.03, "dropout_prob": 0.1}}}}
    t = settings_from_dict(raw, check_paths=False).autoencoder.training
    loss = build_reconstruction_loss(t.loss)
    assert (loss.loss_type, loss.dice_weight, loss.foreground_weight, loss.background_weight, loss.threshold) == (
        "combined", 0.5, 100.0, 0.5, 0.05)
    assert t.denoising.noise_type == "mixed" and t.denoising.noise_std == 0.03


# ------------------------------------------------------------------------------------------------- corruption
def test_corruption_statistics_with_a_fixed_seed():
    shape = (2, 1, 32, 32, 16)
    ones = torch.ones(shape)
    g = torch.Generator().manual_seed(0)
    noisy = corrupt(ones, CorruptionSettings(enabled=True, noise_type="gaussian", noise_std=0.2), generator=g)
    added = noisy - ones
    assert abs(added.mean().item()) < 0.005 and added.std().item() == pytest.approx(0.2, rel=0.03)
    assert torch.equal(ones, torch.ones(shape))  # never in place
    dropped = corrupt(ones, CorruptionSettings(enabled=True, noise_type="dropout", dropout_prob=0.3), generator=g)
    assert set(dropped.unique().tolist()) == {0.0, 1.0}
    assert (dropped == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    mixed = corrupt(ones, CorruptionSettings(enabled=True, noise_type="mixed", noise_std=0.1, dropout_prob=0.2),
                    generator=g)
    zero = mixed == 0
    assert zero.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert (mixed[~zero] - 1).std().item() == pytest.approx(0.1, rel=0.03)


def test_corruption_follows_the_torch_random_state_and_is_off_by_default():
    x = torch.rand(1, 1, 16, 16, 16)
    s = CorruptionSettings(enabled=True, noise_type="mixed")
    torch.manual_seed(5)
    a = corrupt(x, s)
    torch.manual_seed(5)
    b = corrupt(x, s)
    c = corrupt(x, s)
    assert torch.equal(a, b) and not torch.equal(b, c)
    state = torch.get_rng_state()
    assert corrupt(x, CorruptionSettings()) is x and torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="dropout_prob must be in"):
        corrupt(x, CorruptionSettings(enabled=True, noise_type="dropout", dropout_prob=1.0))


# --------------------------------------------------------------------------------------------------- stage runs
def tiny(root: Path, *extra: str) -> list[str]:
    """The tiny run on 16^3 microtubules (2 train, 1 val): autoencoder [4, 4] with factor 2 and one warm-up epoch,
    UNet [4, 4], 20 timesteps, one sample during training, latents encoded each step, sampling of 2 steps."""
    return tiny_overrides(
        root,
        "data.synthetic={enabled: true, kind: microtubules, num_train: 2, num_val: 1, seed: 0}",
        "data.crop_mode=resize",
        "autoencoder.num_channels=[4, 4]",
        "autoencoder.downsample_factors=[2]",
        "autoencoder.training.autoencoder_warm_up_n_epochs=1",
        "diffusion.num_channels=[4, 4]",
        "diffusion.num_head_channels=4",
        "diffusion.scheduler.num_train_timesteps=20",
        "diffusion.training.n_epochs=1",
        "diffusion.training.num_samples_to_generate=1",
        "diffusion.training.cache_latents=false",
        "diffusion.training.scale_factor_batches=1",
        "sampling.num_inference_steps=2",
        *extra,
        leave=("sampling.output_dir",),
    )


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ae")
    train_autoencoder(load_settings(QUICKSTART, tiny(root)))
    return root


def test_stage_two_with_input_noise_encodes_corrupted_volumes(tiny_ae, tmp_path, monkeypatch, capsys):
    root = tiny_ae
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(images, settings, generator=None):
        out = corrupt(images, settings, generator)
        calls.append((images.clone(), out.clone()))
        return out

    encoded: list[torch.Tensor] = []
    encode = AutoencoderKL.encode

    def spy_encode(self, x):
        encoded.append(x.clone())
        return encode(self, x)

    monkeypatch.setattr(stage2, "corrupt", spy)
    monkeypatch.setattr(AutoencoderKL, "encode", spy_encode)
    train_diffusion(load_settings(QUICKSTART, tiny(
        root, "diffusion.training.fast_dev_run=true", f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}",
        "diffusion.training.input_noise={enabled: true, noise_type: gaussian, noise_std: 0.05}")))
    assert "input noise: gaussian (noise_std 0.05" in capsys.readouterr().out
    assert calls  # once per training batch; validation and the scale-factor estimate stay clean
    for clean, noisy in calls:
        assert (noisy - clean).std().item() == pytest.approx(0.05, rel=0.2)
        assert any(torch.equal(noisy, x) for x in encoded)  # the encoder saw the corrupted volumes
    assert len(encoded) > len(calls)  # the scale-factor estimate and validation encode clean volumes


def test_stage_two_resume_with_input_noise_matches_an_uninterrupted_run(tiny_ae, tmp_path):
    extra = ("diffusion.training.n_epochs=2", "diffusion.training.input_noise={enabled: true, noise_type: mixed}")
    train_diffusion(load_settings(QUICKSTART, tiny(tiny_ae, *extra, f"diffusion.checkpoints.output_dir={tmp_path / 'full'}")))
    part = [*extra, f"diffusion.checkpoints.output_dir={tmp_path / 'part'}"]
    train_diffusion(load_settings(QUICKSTART, tiny(tiny_ae, *part, "diffusion.training.n_epochs=1")))
    train_diffusion(load_settings(QUICKSTART, tiny(
        tiny_ae, *part, f"diffusion.checkpoints.resume_from={tmp_path / 'part' / 'latest_checkpoint.pt'}")))
    a = load_checkpoint(tmp_path / "full" / "latest_checkpoint.pt", "diffusion")["state_dict"]["unet"]
    b = load_checkpoint(tmp_path / "part" / "latest_checkpoint.pt", "diffusion")["state_dict"]["unet"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_weighted_recon_loss_type_is_the_seed_vq_configs_name_for_loss_type():
    from monai_diffusion.losses import build_reconstruction_loss

    s = settings_from_dict({"autoencoder": {"training": {"loss": {
        "reconstruction_loss_type": "weighted", "weighted": {"recon_loss_type": "mse"}}}}},
        check_paths=False, require_data=False)
    loss = build_reconstruction_loss(s.autoencoder.training.loss)
    recon, target = torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 0.5)
    assert loss(recon, target)[0].item() == pytest.approx(20.0 * 0.25)  # mse on foreground voxels
    with pytest.raises(ConfigError, match="weighted.recon_loss_type"):
        settings_from_dict({"autoencoder": {"training": {"loss": {"weighted": {
            "recon_loss_type": "l1", "loss_type": "mse"}}}}}, check_paths=False, require_data=False)
