"""The monai-generative 0.2.3 names of the fork's thin layers over MONAI core: nets, schedulers, inferers, losses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import VQVAE, DecoderOnlyTransformer
from monai.networks.nets import AutoencoderKL as CoreAutoencoderKL
from monai.utils import Ordering

from generative.inferers import (
    ControlNetDiffusionInferer,
    ControlNetLatentDiffusionInferer,
    DiffusionInferer,
    LatentDiffusionInferer,
    VQVAETransformerInferer,
)
from generative.losses import JukeboxLoss, PatchAdversarialLoss, PerceptualLoss
from generative.networks.nets import ControlNet, DiffusionModelUNet, MultiScalePatchDiscriminator, PatchDiscriminator
from generative.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules, PNDMScheduler, Scheduler

LEGACY_FIXTURE = Path(__file__).parent / "data" / "legacy_diffusion_0_2_3.pt"

UNET_2D = dict(
    spatial_dims=2,
    in_channels=1,
    out_channels=1,
    num_res_blocks=1,
    num_channels=(8, 8),
    attention_levels=(False, True),
    norm_num_groups=8,
    num_head_channels=4,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------- imports


def test_packages_import_without_lpips_and_torchvision():
    code = (
        "import sys\n"
        "sys.modules['lpips'] = None\n"
        "sys.modules['torchvision'] = None\n"
        "import generative.losses, generative.networks.schedulers, generative.inferers, generative.networks.nets\n"
        "from generative.networks.nets.diffusion_model_unet import DiffusionModelUNet\n"
        "from generative.networks.nets.controlnet import ControlNet\n"
        "from generative.networks.nets.patchgan_discriminator import PatchDiscriminator\n"
        "from generative.networks.schedulers.ddpm import DDPMScheduler, DDPMPredictionType, DDPMVarianceType\n"
        "from generative.networks.schedulers.ddim import DDIMScheduler\n"
        "from generative.networks.schedulers.pndm import PNDMScheduler\n"
        "from generative.networks.schedulers.scheduler import NoiseSchedules, Scheduler\n"
        "from generative.inferers.inferer import LatentDiffusionInferer\n"
        "from generative.losses.perceptual import PerceptualLoss\n"
        "from generative.losses.adversarial_loss import PatchAdversarialLoss\n"
        "from generative.losses.spectral_loss import JukeboxLoss\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------------ nets


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_with_023_names_runs(spatial_dims):
    kwargs = dict(UNET_2D, spatial_dims=spatial_dims, with_conditioning=True, cross_attention_dim=4)
    net = DiffusionModelUNet(**kwargs)
    x = torch.randn(2, 1, *([16] * spatial_dims))
    out = net(x, timesteps=torch.tensor([1, 500]), context=torch.randn(2, 3, 4))
    assert out.shape == x.shape


def test_unet_positional_order_is_023s():
    # 0.2.3 order: ..., upcast_attention, use_flash_attention, dropout_cattn
    net = DiffusionModelUNet(
        2, 1, 1, 1, (8, 8), (False, False), 8, 1e-6, False, 8, False, 1, None, None, False, False, 0.25
    )
    assert net.block_out_channels == (8, 8)
    core_name = DiffusionModelUNet(2, 1, 1, 1, channels=(8, 8), attention_levels=(False, False), norm_num_groups=8)
    assert core_name.block_out_channels == (8, 8)
    default = DiffusionModelUNet(2, 1, 1, attention_levels=(False,) * 4)
    assert tuple(default.block_out_channels) == (32, 64, 64, 64)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (DiffusionModelUNet, dict(UNET_2D)),
        (ControlNet, {k: v for k, v in UNET_2D.items() if k != "out_channels"}),
        (PatchDiscriminator, dict(spatial_dims=2, num_channels=8, in_channels=1)),
        (MultiScalePatchDiscriminator, dict(num_d=2, num_layers_d=2, spatial_dims=2, num_channels=8, in_channels=1)),
    ],
)
def test_both_names_is_a_type_error(cls, kwargs):
    with pytest.raises(TypeError, match=r"'num_channels'.*'channels'"):
        cls(**kwargs, channels=kwargs["num_channels"])


def test_discriminators_require_one_channel_name():
    with pytest.raises(TypeError, match="num_channels"):
        PatchDiscriminator(spatial_dims=2, in_channels=1)
    with pytest.raises(TypeError, match="in_channels"):
        PatchDiscriminator(spatial_dims=2, channels=8)


def test_controlnet_feeds_the_unet():
    unet = DiffusionModelUNet(**UNET_2D)
    controlnet = ControlNet(
        **{k: v for k, v in UNET_2D.items() if k != "out_channels"}, conditioning_embedding_num_channels=(8,)
    )
    controlnet.load_state_dict(unet.state_dict(), strict=False)
    x, cond, t = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), torch.tensor([3, 30])
    down, mid = controlnet(x, t, controlnet_cond=cond, conditioning_scale=1.0)
    out = unet(x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert out.shape == x.shape


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patch_discriminators_with_023_names_run(spatial_dims):
    x = torch.randn(2, 1, *([16] * spatial_dims))
    single = PatchDiscriminator(spatial_dims, 8, 1, num_layers_d=2)
    outs = single(x)
    assert len(outs) == 4 and outs[-1].shape[:2] == (2, 1)
    single.apply(single.initialise_weights)
    multi = MultiScalePatchDiscriminator(2, 1, spatial_dims, 8, 1, minimum_size_im=16)
    out_list, features = multi(x)
    assert len(out_list) == 2 and len(features) == 2


# ------------------------------------------------------------------------------------- 0.2.3 checkpoint keys


@pytest.mark.parametrize("case", ["unet_2d_self_attention", "unet_3d_cross_attention", "controlnet_2d_self_attention"])
def test_023_checkpoint_loads_and_gives_023_outputs(case):
    fixture = torch.load(LEGACY_FIXTURE, weights_only=True)[case]
    cls = {"DiffusionModelUNet": DiffusionModelUNet, "ControlNet": ControlNet}[fixture["net"]]
    model = cls(**fixture["kwargs"]).eval()
    old_keys = set(fixture["state_dict"])
    assert old_keys != set(model.state_dict()), "fixture should hold 0.2.3-only keys"
    model.load_state_dict(fixture["state_dict"])  # strict
    with torch.no_grad():
        output = model(**fixture["inputs"])
    if isinstance(output, tuple):  # ControlNet: (down residuals, mid residual)
        down, mid = output
        for got, want in zip(down, fixture["output"][0]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(mid, fixture["output"][1], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(output, fixture["output"], rtol=0, atol=1e-5)
    # saving gives core keys, which load back unchanged, also into a model that holds the net
    holder = nn.ModuleDict({"net": cls(**fixture["kwargs"])})
    holder.load_state_dict({f"net.{k}": v for k, v in model.state_dict().items()})
    holder.load_state_dict({f"net.{k}": v for k, v in fixture["state_dict"].items()})
    model.load_old_state_dict(fixture["state_dict"])


def test_023_key_names_are_converted():
    fixture = torch.load(LEGACY_FIXTURE, weights_only=True)["unet_2d_self_attention"]
    old = fixture["state_dict"]
    assert "middle_block.attention.to_q.weight" in old and "middle_block.attention.proj_attn.weight" in old
    assert "up_blocks.0.upsampler.conv.conv.weight" in old
    model = DiffusionModelUNet(**fixture["kwargs"])
    model.load_state_dict(old)
    new = model.state_dict()
    torch.testing.assert_close(
        new["middle_block.attention.attn.to_q.weight"], old["middle_block.attention.to_q.weight"]
    )
    torch.testing.assert_close(
        new["up_blocks.0.upsampler.postconv.conv.weight"], old["up_blocks.0.upsampler.conv.conv.weight"]
    )
    # 0.2.3 never applied proj_attn: the converted projection is the identity
    torch.testing.assert_close(new["middle_block.attention.attn.out_proj.weight"], torch.eye(8))
    torch.testing.assert_close(new["middle_block.attention.attn.out_proj.bias"], torch.zeros(8))
    cross = torch.load(LEGACY_FIXTURE, weights_only=True)["unet_3d_cross_attention"]["state_dict"]
    assert "middle_block.attention.transformer_blocks.0.attn1.to_out.0.weight" in cross


def test_unknown_keys_still_fail_strict_loading():
    model = DiffusionModelUNet(**UNET_2D)
    state = model.state_dict()
    state["middle_block.attention.not_a_key.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="not_a_key"):
        model.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ schedulers


@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"])
def test_schedulers_step_and_add_noise(schedule):
    x = torch.randn(2, 1, 8, 8)
    noise = torch.randn_like(x)
    for scheduler in (
        DDPMScheduler(
            num_train_timesteps=100, schedule=schedule, variance_type="fixed_small", prediction_type="epsilon"
        ),
        DDIMScheduler(num_train_timesteps=100, schedule=schedule, steps_offset=1, set_alpha_to_one=False),
        PNDMScheduler(num_train_timesteps=100, schedule=schedule, skip_prk_steps=True),
    ):
        noisy = scheduler.add_noise(original_samples=x, noise=noise, timesteps=torch.tensor([5, 50]))
        assert noisy.shape == x.shape
        assert scheduler.get_velocity(x, noise, torch.tensor([5, 50])).shape == x.shape
        scheduler.set_timesteps(num_inference_steps=10)
        sample = noisy
        for t in scheduler.timesteps:
            sample, _ = scheduler.step(torch.randn_like(x), t, sample)
        assert torch.isfinite(sample).all()


def test_schedulers_are_monai_core_schedulers():
    import monai.networks.schedulers as core

    # DDPM/DDIM: core's, with 0.2.3's set_timesteps spacing (issue 25)
    assert issubclass(DDPMScheduler, core.DDPMScheduler) and issubclass(DDIMScheduler, core.DDIMScheduler)
    assert PNDMScheduler is core.PNDMScheduler and Scheduler is core.Scheduler
    assert NoiseSchedules is core.NoiseSchedules and "cosine" in NoiseSchedules.names
    scheduler = DDIMScheduler(
        1000, "scaled_linear_beta", False, True, 0, "v_prediction", beta_start=0.0015, beta_end=0.0195
    )
    assert scheduler.prediction_type == "v_prediction" and not scheduler.clip_sample
    # 0.2.3's timestep spacing: (n - 1) * (T // n), ..., 0 (core starts at T - 1)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[0] == 900 and scheduler.timesteps[-1] == 0


# ------------------------------------------------------------------------------------------------- inferers


def _tiny_unet(channels: int = 1, spatial_dims: int = 2) -> DiffusionModelUNet:
    return DiffusionModelUNet(
        **dict(
            UNET_2D,
            spatial_dims=spatial_dims,
            in_channels=channels,
            out_channels=channels,
            attention_levels=(False, False),
        )
    )


def test_diffusion_inferer_train_call_and_sample():
    scheduler = DDPMScheduler(num_train_timesteps=20)
    inferer = DiffusionInferer(scheduler)
    model = _tiny_unet()
    x = torch.randn(2, 1, 16, 16)
    pred = inferer(inputs=x, diffusion_model=model, noise=torch.randn_like(x), timesteps=torch.tensor([1, 10]))
    assert pred.shape == x.shape
    scheduler.set_timesteps(num_inference_steps=2)
    sample, intermediates = inferer.sample(
        input_noise=torch.randn(1, 1, 16, 16),
        diffusion_model=model,
        save_intermediates=True,
        intermediate_steps=1,
        verbose=False,
    )
    assert sample.shape == (1, 1, 16, 16) and len(intermediates) == 2


@pytest.mark.parametrize("controlled", [False, True])
def test_latent_diffusion_inferer_with_core_autoencoder(controlled):
    autoencoder = CoreAutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, False),
        latent_channels=2,
        num_res_blocks=1,
        norm_num_groups=8,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    ).eval()
    unet = _tiny_unet(channels=2, spatial_dims=3)
    scheduler = DDIMScheduler(num_train_timesteps=20)
    x = torch.randn(1, 1, 16, 16, 16)
    noise = torch.randn(1, 2, 8, 8, 8)
    t = torch.tensor([7])
    if controlled:
        controlnet = ControlNet(
            spatial_dims=3,
            in_channels=2,
            num_res_blocks=1,
            num_channels=(8, 8),
            attention_levels=(False, False),
            norm_num_groups=8,
            conditioning_embedding_in_channels=1,
            conditioning_embedding_num_channels=(8,),
        )
        cn_cond = torch.randn(1, 1, 8, 8, 8)
        inferer = ControlNetLatentDiffusionInferer(scheduler, scale_factor=0.5)
        pred = inferer(x, autoencoder, unet, controlnet, noise, t, cn_cond)
        scheduler.set_timesteps(2)
        sample = inferer.sample(noise, autoencoder, unet, controlnet, cn_cond, verbose=False)
        image_inferer = ControlNetDiffusionInferer(scheduler)
        assert image_inferer(noise, unet, controlnet, noise, t, cn_cond).shape == noise.shape
    else:
        inferer = LatentDiffusionInferer(scheduler, scale_factor=0.5)
        pred = inferer(inputs=x, autoencoder_model=autoencoder, diffusion_model=unet, noise=noise, timesteps=t)
        scheduler.set_timesteps(num_inference_steps=2)
        sample = inferer.sample(
            input_noise=noise, autoencoder_model=autoencoder, diffusion_model=unet, scheduler=scheduler, verbose=False
        )
    assert pred.shape == noise.shape
    assert sample.shape == x.shape


def test_vqvae_transformer_inferer_with_core_models():
    vqvae = VQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        num_res_channels=(8, 8),
        num_res_layers=1,
        downsample_parameters=((2, 4, 1, 1),) * 2,
        upsample_parameters=((2, 4, 1, 1, 0),) * 2,
        num_embeddings=8,
        embedding_dim=4,
    ).eval()
    transformer = DecoderOnlyTransformer(
        num_tokens=9, max_seq_len=16, attn_layers_dim=8, attn_layers_depth=1, attn_layers_heads=1
    )
    ordering = Ordering(ordering_type="raster_scan", spatial_dims=2, dimensions=(1, 4, 4))
    inferer = VQVAETransformerInferer()
    logits = inferer(torch.randn(1, 1, 16, 16), vqvae, transformer, ordering)
    assert logits.shape == (1, 16, 9)
    sample = inferer.sample((4, 4), torch.full((1, 1), 8), vqvae, transformer, ordering, verbose=False)
    assert sample.shape == (1, 1, 16, 16)


# --------------------------------------------------------------------------------------------------- losses


def test_patch_adversarial_loss_and_jukebox_loss():
    disc = PatchDiscriminator(spatial_dims=2, num_channels=8, in_channels=1, num_layers_d=2)
    logits = disc(torch.randn(2, 1, 16, 16))[-1]
    for criterion in ("least_squares", "bce", "hinge"):
        loss = PatchAdversarialLoss(criterion=criterion)
        generator_loss = loss(logits, target_is_real=True, for_discriminator=False)
        fake_loss = loss(logits, target_is_real=False, for_discriminator=True)
        assert generator_loss.ndim == 0 and fake_loss.ndim == 0
    loss = PatchAdversarialLoss()
    single = loss.forward_single(logits, loss.get_target_tensor(logits, target_is_real=True))
    assert torch.isfinite(single)
    spectral = JukeboxLoss(spatial_dims=2)(torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16))
    assert spectral.ndim == 0 and spectral > 0


@pytest.fixture
def offline(monkeypatch):
    """Fail the test on any attempt to open a network connection or to load a model through torch hub."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def _pretend_installed(monkeypatch, *names):
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)


def test_perceptual_loss_names_missing_packages(monkeypatch, offline):
    monkeypatch.setitem(sys.modules, "lpips", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(RuntimeError, match=r"lpips.*pip install lpips"):
        PerceptualLoss(spatial_dims=2, network_type="alex")
    with pytest.raises(RuntimeError, match=r"torchvision"):
        PerceptualLoss(spatial_dims=3, network_type="resnet50", is_fake_3d=True)


@pytest.mark.parametrize(
    "network_type, file_name", [("alex", "alexnet-owt-7be5be79.pth"), ("resnet50", "resnet50-11ad3fa6.pth")]
)
def test_perceptual_loss_without_local_weights_says_what_to_pass(
    monkeypatch, offline, tmp_path, network_type, file_name
):
    _pretend_installed(monkeypatch, "lpips", "torchvision")
    with pytest.raises(RuntimeError, match=rf"pretrained_path='/path/to/{file_name}'") as error:
        PerceptualLoss(spatial_dims=2, network_type=network_type, cache_dir=str(tmp_path))
    assert str(tmp_path / "checkpoints" / file_name) in str(error.value)
    with pytest.raises(ValueError, match="pretrained_path='/no/such/file.pth' is not a file"):
        PerceptualLoss(spatial_dims=2, network_type=network_type, pretrained_path="/no/such/file.pth")


def test_perceptual_loss_torch_hub_networks_need_a_cached_repo(offline, tmp_path):
    with pytest.raises(RuntimeError, match=r"Project-MONAI/perceptual-models.*cache_dir"):
        PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="Project-MONAI_perceptual-models_main"):
        PerceptualLoss(
            spatial_dims=3, network_type="medicalnet_resnet10_23datasets", is_fake_3d=False, cache_dir=str(tmp_path)
        )
    with pytest.raises(ValueError, match="pretrained_path"):
        PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50", pretrained_path=str(tmp_path))


def test_perceptual_loss_uses_a_local_backbone_file(monkeypatch, offline, tmp_path):
    """With a stand-in for lpips that reads the backbone the way torchvision does: from <hub dir>/checkpoints."""
    _pretend_installed(monkeypatch, "lpips", "torchvision")
    seen = {}

    class FakeLPIPS(nn.Module):
        def __init__(self, pretrained: bool = True, net: str = "alex", verbose: bool = True):
            super().__init__()
            cached = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
            seen["weights"] = torch.load(cached, weights_only=True)

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return ((input - target) ** 2).mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setattr("monai.losses.perceptual.LPIPS", FakeLPIPS)
    hub_before = torch.hub.get_dir()
    weights = tmp_path / "my_alexnet.pth"
    torch.save({"model": {"features.0.weight": torch.ones(2)}}, weights)
    loss = PerceptualLoss(
        spatial_dims=3, network_type="alex", pretrained_path=str(weights), pretrained_state_dict_key="model"
    )
    torch.testing.assert_close(seen["weights"]["features.0.weight"], torch.ones(2))
    assert torch.hub.get_dir() == hub_before
    value = loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    assert value.ndim == 0
