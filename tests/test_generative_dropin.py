"""Every public module and name of monai-generative 0.2.3 at its 0.2.3 path: imports, argument names, shapes,
errors, and 0.2.3 checkpoints (fixture written by the real 0.2.3 code, see tests/data/make_legacy_dropin_fixture.py)."""

from __future__ import annotations

import copy
import json
import importlib
import os
import subprocess
import sys
from pathlib import Path

import monai.metrics
import monai.networks.nets
import pytest
import torch

from generative.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric, SSIMMetric
from generative.metrics.ssim import compute_ssim_and_cs
from generative.networks.blocks import SABlock, SpatialRescaler, TransformerBlock
from generative.networks.layers import EMAQuantizer, VectorQuantizer
from generative.networks.nets import (
    VQVAE,
    DecoderOnlyTransformer,
    SPADEAutoencoderKL,
    SPADEDiffusionModelUNet,
    SPADENet,
)
from generative.networks.nets.spade_network import KLDLoss
from generative.utils import (
    AdversarialKeys,
    ComponentStore,
    Ordering,
    OrderingTransformations,
    OrderingType,
    unsqueeze_left,
    unsqueeze_right,
)

FIXTURE = Path(__file__).parent / "data" / "legacy_dropin_0_2_3.pt"

# Every module of the monai-generative 0.2.3 wheel with the public names its tests and tutorials import from it.
PUBLIC_023 = {
    "generative": ["__version__"],
    "generative.version": ["__version__"],
    "generative.engines": ["AdversarialTrainer", "DiffusionPrepareBatch", "VPredictionPrepareBatch"],
    "generative.engines.prepare_batch": ["DiffusionPrepareBatch", "VPredictionPrepareBatch"],
    "generative.engines.trainer": ["AdversarialTrainer"],
    "generative.inferers": [
        "ControlNetDiffusionInferer",
        "ControlNetLatentDiffusionInferer",
        "DiffusionInferer",
        "LatentDiffusionInferer",
        "VQVAETransformerInferer",
    ],
    "generative.inferers.inferer": ["DiffusionInferer", "VQVAETransformerInferer"],
    "generative.losses": ["JukeboxLoss", "PatchAdversarialLoss", "PerceptualLoss"],
    "generative.losses.adversarial_loss": ["PatchAdversarialLoss"],
    "generative.losses.perceptual": ["PerceptualLoss"],
    "generative.losses.spectral_loss": ["JukeboxLoss"],
    "generative.metrics": ["FIDMetric", "MMDMetric", "MultiScaleSSIMMetric", "SSIMMetric"],
    "generative.metrics.fid": ["FIDMetric", "get_fid_score", "compute_frechet_distance"],
    "generative.metrics.mmd": ["MMDMetric"],
    "generative.metrics.ms_ssim": ["MultiScaleSSIMMetric", "KernelType"],
    "generative.metrics.ssim": ["SSIMMetric", "KernelType", "compute_ssim_and_cs"],
    "generative.networks.blocks": ["SABlock", "SpatialRescaler", "TransformerBlock"],
    "generative.networks.blocks.encoder_modules": ["SpatialRescaler"],
    "generative.networks.blocks.selfattention": ["SABlock"],
    "generative.networks.blocks.spade_norm": ["SPADE"],
    "generative.networks.blocks.transformerblock": ["TransformerBlock"],
    "generative.networks.layers": ["EMAQuantizer", "VectorQuantizer"],
    "generative.networks.layers.vector_quantizer": ["EMAQuantizer", "VectorQuantizer"],
    "generative.networks.nets": [
        "AutoencoderKL",
        "ControlNet",
        "DecoderOnlyTransformer",
        "DiffusionModelUNet",
        "MultiScalePatchDiscriminator",
        "PatchDiscriminator",
        "SPADEAutoencoderKL",
        "SPADEDiffusionModelUNet",
        "SPADENet",
        "VQVAE",
    ],
    "generative.networks.nets.autoencoderkl": ["AutoencoderKL", "Encoder", "Decoder"],
    "generative.networks.nets.controlnet": ["ControlNet"],
    "generative.networks.nets.diffusion_model_unet": ["DiffusionModelUNet"],
    "generative.networks.nets.patchgan_discriminator": ["MultiScalePatchDiscriminator", "PatchDiscriminator"],
    "generative.networks.nets.spade_autoencoderkl": ["SPADEAutoencoderKL"],
    "generative.networks.nets.spade_diffusion_model_unet": ["SPADEDiffusionModelUNet"],
    "generative.networks.nets.spade_network": ["SPADENet", "KLDLoss"],
    "generative.networks.nets.transformer": ["DecoderOnlyTransformer"],
    "generative.networks.nets.vqvae": ["VQVAE"],
    "generative.networks.schedulers": [
        "DDIMScheduler",
        "DDPMScheduler",
        "NoiseSchedules",
        "PNDMScheduler",
        "Scheduler",
    ],
    "generative.networks.schedulers.ddim": ["DDIMScheduler"],
    "generative.networks.schedulers.ddpm": ["DDPMScheduler", "DDPMPredictionType", "DDPMVarianceType"],
    "generative.networks.schedulers.pndm": ["PNDMScheduler"],
    "generative.networks.schedulers.scheduler": ["NoiseSchedules", "Scheduler"],
    "generative.utils": [
        "AdversarialIterationEvents",
        "AdversarialKeys",
        "ComponentStore",
        "unsqueeze_left",
        "unsqueeze_right",
    ],
    "generative.utils.component_store": ["ComponentStore"],
    "generative.utils.enums": [
        "AdversarialIterationEvents",
        "AdversarialKeys",
        "OrderingTransformations",
        "OrderingType",
    ],
    "generative.utils.misc": ["unsqueeze_left", "unsqueeze_right"],
    "generative.utils.ordering": ["Ordering", "OrderingType", "OrderingTransformations"],
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------- imports


def test_every_023_name_imports_without_optional_packages():
    """In a fresh interpreter where lpips, torchvision, ignite and scipy cannot be imported."""
    code = (
        "import importlib, json, sys\n"
        "for blocked in ('lpips', 'torchvision', 'ignite', 'scipy'):\n"
        "    sys.modules[blocked] = None\n"
        f"public = json.loads({json.dumps(PUBLIC_023)!r})\n"
        "missing = [f'{m}.{n}' for m, names in public.items() for n in names\n"
        "           if not hasattr(importlib.import_module(m), n)]\n"
        "assert not missing, missing\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_package_all_lists_are_importable():
    for module_name in PUBLIC_023:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{module_name}.__all__ names {name}, which it does not define"


# ---------------------------------------------------------------------------------------------------- VQVAE

VQVAE_023 = dict(
    spatial_dims=2,
    in_channels=1,
    out_channels=1,
    num_channels=(4, 8),
    num_res_layers=1,
    num_res_channels=(4, 8),
    downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
    upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
    num_embeddings=8,
    embedding_dim=4,
)


def test_vqvae_with_023_names_runs_and_is_core_vqvae():
    net = VQVAE(**VQVAE_023).eval()
    assert isinstance(net, monai.networks.nets.VQVAE)
    assert net.num_channels == net.channels == (4, 8)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        reconstruction, quantization_loss = net(x)
        codes = net.index_quantize(x)
    assert reconstruction.shape == x.shape
    assert quantization_loss.ndim == 0
    assert codes.shape == (2, 4, 4) and codes.max() < 8


def test_vqvae_same_keys_as_core():
    ours = VQVAE(**VQVAE_023).state_dict()
    core_kwargs = dict(VQVAE_023, channels=VQVAE_023["num_channels"])
    del core_kwargs["num_channels"]
    assert ours.keys() == monai.networks.nets.VQVAE(**core_kwargs).state_dict().keys()


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (VQVAE, dict(VQVAE_023, channels=(4, 8))),
        (SPADENet, dict(spatial_dims=2, in_channels=1, out_channels=1, label_nc=2, input_shape=(8, 8),
                        num_channels=[4], channels=[4], z_dim=2)),
        (SPADEAutoencoderKL, dict(spatial_dims=2, label_nc=2, num_channels=(4,), channels=(4,))),
        (SPADEDiffusionModelUNet, dict(spatial_dims=2, in_channels=1, out_channels=1, label_nc=2,
                                       num_channels=(4,), channels=(4,))),
        (SSIMMetric, dict(spatial_dims=2, kernel_size=7, win_size=7)),
    ],
)
def test_both_names_is_a_type_error(cls, kwargs):
    with pytest.raises(TypeError, match="both"):
        cls(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (VQVAE, dict(VQVAE_023, num_res_units=2)),  # a MONAI UNet argument, never a VQVAE one
        (SABlock, dict(hidden_size=8, num_heads=2, save_attn=True)),  # core SABlock only
        (TransformerBlock, dict(hidden_size=8, mlp_dim=8, num_heads=2, save_attn=True)),  # core only
        (DecoderOnlyTransformer, dict(num_tokens=4, max_seq_len=4, attn_layers_dim=4, attn_layers_depth=1,
                                      attn_layers_heads=1, dropout=0.1)),
        (SpatialRescaler, dict(scale_factor=2.0)),
    ],
)
def test_an_argument_023_did_not_have_is_a_type_error(cls, kwargs):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        cls(**kwargs)


def test_spadenet_requires_one_channel_name():
    with pytest.raises(TypeError, match="num_channels"):
        SPADENet(spatial_dims=2, in_channels=1, out_channels=1, label_nc=2, input_shape=(8, 8), z_dim=2)


# -------------------------------------------------------------------------------------------- transformer


def test_decoder_only_transformer_positional_order_is_023s():
    net = DecoderOnlyTransformer(10, 12, 8, 1, 2, True, 0.1, True)
    assert net.blocks[0].attn.use_flash_attention is True
    assert net.with_cross_attention is True
    assert net.embedding_dropout.p == 0.1
    assert any(k.endswith("attn.to_q.weight") for k in net.state_dict())  # 0.2.3's separate q/k/v layers


def test_decoder_only_transformer_runs_with_context():
    net = DecoderOnlyTransformer(num_tokens=10, max_seq_len=12, attn_layers_dim=8, attn_layers_depth=1,
                                 attn_layers_heads=2, with_cross_attention=True).eval()
    with torch.no_grad():
        logits = net(torch.randint(0, 10, (2, 12)), context=torch.randn(2, 3, 8))
    assert logits.shape == (2, 12, 10)


def test_transformer_block_norms_are_converted_with_cross_attention():
    """0.2.3: norm2 before cross-attention, norm3 before the MLP; core: norm_cross_attn and norm2."""
    block = TransformerBlock(8, 16, 2, with_cross_attention=True)
    old = {}
    for key, value in block.state_dict().items():
        key = key.replace("norm2.", "norm3.").replace("norm_cross_attn.", "norm2.")
        old[key] = torch.full_like(value, 3.0) if key.startswith("norm2.") else value.clone()
    old["norm3.weight"] = torch.full_like(old["norm3.weight"], 5.0)
    block.load_state_dict(old)
    assert torch.all(block.norm_cross_attn.weight == 3.0) and torch.all(block.norm_cross_attn.bias == 3.0)
    assert torch.all(block.norm2.weight == 5.0)


def test_transformer_block_without_cross_attention_gets_an_unused_initial_norm():
    block = TransformerBlock(8, 16, 2)
    old = {k.replace("norm2.", "norm3."): v for k, v in block.state_dict().items() if "norm_cross_attn" not in k}
    with torch.no_grad():
        block.norm_cross_attn.weight.fill_(7.0)
    block.load_state_dict(old)
    assert torch.all(block.norm_cross_attn.weight == 1.0) and torch.all(block.norm_cross_attn.bias == 0.0)


def test_unknown_keys_still_fail_strict_loading():
    net = DecoderOnlyTransformer(num_tokens=4, max_seq_len=4, attn_layers_dim=4, attn_layers_depth=1,
                                 attn_layers_heads=1)
    state = net.state_dict()
    state["blocks.0.norm9.weight"] = torch.ones(4)
    with pytest.raises(RuntimeError, match="norm9"):
        net.load_state_dict(state)


def test_sablock_is_023s_layout_and_attends_to_context():
    block = SABlock(8, 2, 0.0, True).eval()
    assert sorted(block.state_dict()) == sorted(
        f"{n}.{p}" for n in ("to_q", "to_k", "to_v", "out_proj") for p in ("weight", "bias")
    )
    x, context = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        self_out, cross_out = block(x), block(x, context=context)
    assert self_out.shape == cross_out.shape == (2, 5, 8)
    assert not torch.allclose(self_out, cross_out)


def test_sablock_causal_needs_sequence_length():
    with pytest.raises(ValueError, match="sequence_length"):
        SABlock(8, 2, causal=True)


# ---------------------------------------------------------------------------------------------------- SPADE


def test_spadenet_returns_023s_image_and_kld():
    net = SPADENet(spatial_dims=2, in_channels=1, out_channels=1, label_nc=3, input_shape=(16, 16),
                   num_channels=[4, 8], z_dim=4, spade_intermediate_channels=4).eval()
    seg, x = torch.rand(2, 3, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        image, kld = net(seg, x)
        z_mu, z_logvar = net.encoder(x)
    assert image.shape == (2, 1, 16, 16)
    torch.testing.assert_close(kld, KLDLoss()(z_mu, z_logvar))
    with pytest.raises(ValueError, match="is_vae"):
        net(seg)


def test_spadenet_gan_mode_returns_a_one_tuple():
    net = SPADENet(3, 1, 2, 2, (8, 8, 8), [4, 4], is_vae=False, spade_intermediate_channels=4).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, 8, 8, 8))
    assert len(out) == 1 and out[0].shape == (1, 2, 8, 8, 8)


def test_kld_loss_known_values():
    zeros = torch.zeros(2, 3)
    assert KLDLoss()(zeros, zeros) == 0.0  # N(0, 1) against itself
    assert KLDLoss()(torch.ones(2, 3), zeros) == pytest.approx(3.0)  # 6 elements, each 0.5 * mu^2


def test_spade_autoencoderkl_023_positional_order_and_shapes():
    # 0.2.3 order: ..., with_decoder_nonlocal_attn, use_flash_attention, spade_intermediate_channels
    net = SPADEAutoencoderKL(2, 3, 1, 1, 1, (4, 8), (False, True), 2, 4, 1e-6, True, True, False, 4).eval()
    assert net.decoder.blocks[1].norm1.mlp_shared.conv.out_channels == 4
    x, seg = torch.randn(1, 1, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        reconstruction, z_mu, z_sigma = net(x, seg)
    assert reconstruction.shape == x.shape and z_mu.shape == (1, 2, 8, 8) and z_sigma.shape == z_mu.shape


def test_spade_unet_with_023_names_runs():
    net = SPADEDiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=2, label_nc=3, num_res_blocks=1,
                                  num_channels=(8, 8), attention_levels=(False, True), norm_num_groups=4,
                                  num_head_channels=4, spade_intermediate_channels=4).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16), torch.tensor([3]), torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 2, 16, 16)


# ------------------------------------------------------------------------------------ 0.2.3 checkpoints

_FIXTURE_CASES = sorted(torch.load(FIXTURE, weights_only=False)) if FIXTURE.exists() else []


@pytest.fixture(scope="module")
def legacy():
    return torch.load(FIXTURE, weights_only=False)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


@pytest.mark.parametrize("case", _FIXTURE_CASES)
def test_023_checkpoint_loads_and_gives_023_outputs(legacy, case):
    fixture = legacy[case]
    cls = getattr(importlib.import_module(fixture["module"]), fixture["class"])
    model = cls(**copy.deepcopy(fixture["kwargs"])).eval()
    model.load_state_dict(fixture["state_dict"])  # strict
    with torch.no_grad():
        output = getattr(model, fixture["call"])(**fixture["inputs"])
    got, want = _as_tuple(output), _as_tuple(fixture["output"])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_fixture_covers_every_converted_network(legacy):
    classes = {fixture["class"] for fixture in legacy.values()}
    assert {"VQVAE", "DecoderOnlyTransformer", "SPADENet", "SPADEAutoencoderKL", "SPADEDiffusionModelUNet",
            "SABlock", "TransformerBlock", "SPADE"} <= classes


def test_023_spade_autoencoder_keys_really_differ_from_core(legacy):
    """The conversion is exercised: 0.2.3's keys are not core's."""
    old_keys = set(legacy["spade_autoencoderkl_2d"]["state_dict"])
    new_keys = set(SPADEAutoencoderKL(**legacy["spade_autoencoderkl_2d"]["kwargs"]).state_dict())
    assert any(k.endswith(".proj_attn.weight") for k in old_keys - new_keys)
    assert any(k.endswith(".postconv.conv.weight") for k in new_keys - old_keys)


# ------------------------------------------------------------------------------------------ blocks, layers


@pytest.mark.parametrize(
    "kwargs, shape, expected",
    [
        (dict(spatial_dims=2, multiplier=0.5, in_channels=None), (1, 1, 16, 16), (1, 1, 8, 8)),
        (dict(spatial_dims=2, multiplier=0.5, n_stages=2, in_channels=3, out_channels=2), (1, 3, 16, 16),
         (1, 2, 4, 4)),
        (dict(spatial_dims=3, method="trilinear", multiplier=(0.25, 0.5, 0.75), in_channels=3, out_channels=2),
         (1, 3, 8, 8, 8), (1, 2, 2, 4, 6)),
        (dict(spatial_dims=3, method="nearest", size=(4, 6, 2), in_channels=None), (1, 1, 8, 8, 8), (1, 1, 4, 6, 2)),
    ],
)
def test_spatial_rescaler_shapes(kwargs, shape, expected):
    rescaler = SpatialRescaler(**kwargs)
    assert rescaler.encode(torch.randn(shape)).shape == expected


def test_spatial_rescaler_nearest_halving_picks_every_other_pixel():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(SpatialRescaler(method="nearest", multiplier=0.5)(x), x[:, :, ::2, ::2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=(8, 8), multiplier=0.5), "not both"),
        (dict(size=(8, 8), n_stages=2), "n_stages=1"),
        (dict(method="cubic"), "method='cubic'"),
        (dict(n_stages=-1), "n_stages=-1"),
    ],
)
def test_spatial_rescaler_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialRescaler(**kwargs)


def test_vector_quantizer_layers_are_cores():
    quantizer = VectorQuantizer(EMAQuantizer(spatial_dims=2, num_embeddings=8, embedding_dim=4)).eval()
    loss, quantized = quantizer(torch.randn(2, 4, 3, 3))
    assert quantized.shape == (2, 4, 3, 3) and loss.ndim == 0
    assert sorted(quantizer.state_dict()) == [
        "quantizer.ema_cluster_size",
        "quantizer.ema_w",
        "quantizer.embedding.weight",
    ]


# --------------------------------------------------------------------------------------------------- metrics


def test_ssim_metric_kernel_size_is_cores_win_size():
    x, y = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    ours = SSIMMetric(spatial_dims=2, kernel_size=7)(x, y)
    torch.testing.assert_close(ours, monai.metrics.SSIMMetric(spatial_dims=2, win_size=7)(x, y))
    torch.testing.assert_close(SSIMMetric(spatial_dims=2)(x, x), torch.ones(2, 1))


def test_compute_ssim_and_cs_takes_023_order_and_scalars():
    x = torch.rand(1, 1, 16, 16)
    ssim, cs = compute_ssim_and_cs(x, x, 2, 1.0, "gaussian", 5, 1.0)
    torch.testing.assert_close(ssim, torch.ones_like(ssim))
    torch.testing.assert_close(cs, torch.ones_like(cs))


def test_ms_ssim_and_fid_are_cores():
    assert MultiScaleSSIMMetric is monai.metrics.MultiScaleSSIMMetric
    assert FIDMetric is monai.metrics.FIDMetric
    features = torch.randn(16, 4, dtype=torch.float64)
    assert float(FIDMetric()(features, features)) == pytest.approx(0.0, abs=1e-6)


def test_mmd_metric_transforms_y_and_y_pred_separately():
    y, y_pred = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    metric = MMDMetric(y_transform=lambda t: 2 * t, y_pred_transform=lambda t: t + 1)
    torch.testing.assert_close(metric(y, y_pred), MMDMetric()(2 * y, y_pred + 1))
    assert not torch.allclose(metric(y, y_pred), MMDMetric()(y, y_pred))


def _mmd_023(y, y_pred):
    """0.2.3's formula written out: linear kernel over flattened images / features, means over all pairs."""
    y, y_pred = y.reshape(len(y), -1).double(), y_pred.reshape(len(y_pred), -1).double()
    f = y.shape[1]
    total = 0.0
    for a, b, w in ((y, y, 1.0), (y_pred, y_pred, 1.0), (y_pred, y, -2.0)):
        total += w * sum(float(a[i] @ b[j]) / f for i in range(len(a)) for j in range(len(b))) / (len(a) * len(b))
    return total


def test_mmd_metric_gives_023_values():
    torch.manual_seed(0)
    y, y_pred = torch.rand(3, 1, 6, 5), torch.rand(3, 1, 6, 5) * 2
    assert float(MMDMetric()(y, y_pred)) == pytest.approx(_mmd_023(y, y_pred), rel=1e-5)
    assert float(MMDMetric()(y, y)) == pytest.approx(0.0, abs=1e-6)  # core gives a negative value here
    one = torch.rand(1, 2, 4, 4, 4)
    assert float(MMDMetric()(one, one + 1)) == pytest.approx(_mmd_023(one, one + 1), rel=1e-5)  # batch of one


def test_schedulers_space_timesteps_as_023():
    from generative.networks.schedulers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ddpm.set_timesteps(3)
    assert ddpm.timesteps.tolist() == [666, 333, 0]
    ddim = DDIMScheduler(num_train_timesteps=10, steps_offset=1)
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [7, 5, 3, 1]
    with pytest.raises(ValueError):
        DDPMScheduler(clip_sample_min=1.0, clip_sample_max=-1.0)


def test_diffusion_model_encoder_at_its_023_path():
    from generative.networks.nets.diffusion_model_unet import DiffusionModelEncoder

    # 0.2.3 positional order: spatial_dims, in_channels, out_channels, num_res_blocks, num_channels,
    # attention_levels, norm_num_groups; every level halves the size: 64x64 -> 8x8 x 64 channels = 4096 features,
    # the fixed input size of 0.2.3's head
    net = DiffusionModelEncoder(2, 1, 3, 1, (16, 16, 64), (False, False, False), 16).eval()
    assert net.out[0].in_features == 4096
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 64), torch.tensor([3, 7])).shape == (2, 3)
    sized = DiffusionModelEncoder(2, 1, 3, 1, (16, 16), (False, False), 16, input_shape=(16, 16))
    assert sized.out[0].in_features == 4 * 4 * 16  # core's head sized from input_shape
    with pytest.raises(TypeError):
        DiffusionModelEncoder(2, 1, 3, num_channels=(16,), channels=(16,), attention_levels=(False,))


def test_mmd_metric_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        MMDMetric(y_pred_transform=lambda t: t[:, :, :4])(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))


# -------------------------------------------------------------------------------------------- utils, engines


def test_ordering_raster_scan_and_enums():
    ordering = Ordering(ordering_type=OrderingType.RASTER_SCAN, spatial_dims=2, dimensions=(1, 2, 3))
    assert ordering.get_sequence_ordering().tolist() == list(range(6))
    s_curve = Ordering(ordering_type="s_curve", spatial_dims=2, dimensions=(1, 2, 3))
    assert s_curve.get_sequence_ordering().tolist() == [0, 1, 2, 5, 4, 3]
    assert OrderingTransformations.ROTATE_90 == "rotate_90"
    assert AdversarialKeys.REALS == "reals" and AdversarialKeys.FAKE_LOGITS == "fake_logits"


def test_unsqueeze_and_component_store():
    assert unsqueeze_right(torch.ones(3), 4).shape == (3, 1, 1, 1)
    assert unsqueeze_left(torch.ones(3), 4).shape == (1, 1, 1, 3)
    store = ComponentStore("Shapes", "test store")

    @store.add_def("double", "twice the input")
    def double(x: int) -> int:
        return 2 * x

    assert "double" in store and store.double(4) == 8


def test_engines_are_cores():
    import monai.engines

    from generative.engines import AdversarialTrainer, DiffusionPrepareBatch, VPredictionPrepareBatch

    assert AdversarialTrainer is monai.engines.AdversarialTrainer
    assert issubclass(VPredictionPrepareBatch, DiffusionPrepareBatch)
    assert DiffusionPrepareBatch(num_train_timesteps=10).get_noise(torch.zeros(2, 1, 4, 4)).shape == (2, 1, 4, 4)


def test_vqvae_transformer_inferer_with_fork_models():
    from generative.inferers import VQVAETransformerInferer

    vqvae = VQVAE(**VQVAE_023).eval()
    transformer = DecoderOnlyTransformer(num_tokens=9, max_seq_len=16, attn_layers_dim=8, attn_layers_depth=1,
                                         attn_layers_heads=2).eval()
    ordering = Ordering(ordering_type="raster_scan", spatial_dims=2, dimensions=(1, 4, 4))
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        logits, target, _ = VQVAETransformerInferer()(images, vqvae, transformer, ordering, return_latent=True)
        likelihood = VQVAETransformerInferer().get_likelihood(images, vqvae, transformer, ordering)
    assert logits.shape == (2, 16, 9) and target.shape == (2, 16)
    assert likelihood.shape == (2, 4, 4)


# --------------------------------------------------------------------------------------- ControlNet inferers


def _controlnet_models(mode: str):
    from generative.networks.nets import ControlNet, DiffusionModelUNet

    common = dict(spatial_dims=2, num_res_blocks=1, num_channels=(8, 8), attention_levels=(False, True),
                  norm_num_groups=8, num_head_channels=4)
    cross = dict(with_conditioning=True, cross_attention_dim=3) if mode == "crossattn" else {}
    unet = DiffusionModelUNet(in_channels=2 if mode == "concat" else 1, out_channels=1, **common, **cross).eval()
    # as in 0.2.3 tutorials: the ControlNet takes the image channels only and has no cross-attention
    controlnet = ControlNet(in_channels=1, conditioning_embedding_num_channels=(8,), **common).eval()
    condition = torch.randn(1, 1, 8, 8) if mode == "concat" else torch.randn(1, 2, 3)
    return unet, controlnet, condition


@pytest.mark.parametrize("mode", ["concat", "crossattn"])
def test_controlnet_inferer_calls_the_controlnet_as_023_did(mode):
    import monai.inferers

    from generative.inferers import ControlNetDiffusionInferer
    from generative.networks.schedulers import DDPMScheduler

    unet, controlnet, condition = _controlnet_models(mode)
    scheduler = DDPMScheduler(num_train_timesteps=10)
    inputs, noise, cn_cond = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    timesteps = torch.tensor([3])
    inferer = ControlNetDiffusionInferer(scheduler)
    with torch.no_grad():
        prediction = inferer(inputs, unet, controlnet, noise, timesteps, cn_cond, condition=condition, mode=mode)
        scheduler.set_timesteps(2)
        sample = inferer.sample(noise, unet, controlnet=controlnet, cn_cond=cn_cond, scheduler=scheduler,
                                conditioning=condition, mode=mode, verbose=False)
    assert prediction.shape == sample.shape == (1, 1, 8, 8)
    with pytest.raises((RuntimeError, ValueError)):  # core gives the ControlNet the condition too
        with torch.no_grad():
            monai.inferers.ControlNetDiffusionInferer(scheduler)(
                inputs, unet, controlnet, noise, timesteps, cn_cond, condition=condition, mode=mode
            )


INFERER_FIXTURE = Path(__file__).parent / "data" / "legacy_controlnet_inferer_0_2_3.pt"


@pytest.mark.parametrize("mode", ["concat", "crossattn"])
def test_controlnet_inferer_gives_023_outputs(mode):
    """Same models, inputs and noise schedule as 0.2.3's inferer (tests/data/make_legacy_inferer_fixture.py)."""
    from generative.inferers import ControlNetDiffusionInferer
    from generative.networks.nets import ControlNet, DiffusionModelUNet
    from generative.networks.schedulers import DDPMScheduler

    fixture = torch.load(INFERER_FIXTURE, weights_only=False)[mode]
    unet = DiffusionModelUNet(**fixture["unet_kwargs"]).eval()
    unet.load_state_dict(fixture["unet"])
    controlnet = ControlNet(**fixture["controlnet_kwargs"]).eval()
    controlnet.load_state_dict(fixture["controlnet"])
    inferer = ControlNetDiffusionInferer(DDPMScheduler(num_train_timesteps=fixture["num_train_timesteps"]))
    with torch.no_grad():
        output = inferer(diffusion_model=unet, controlnet=controlnet, **fixture["inputs"])
    torch.testing.assert_close(output, fixture["output"], rtol=0, atol=1e-5)


def test_controlnet_latent_inferer_concat_with_a_023_controlnet():
    from generative.inferers import ControlNetLatentDiffusionInferer
    from generative.networks.schedulers import DDPMScheduler

    unet, controlnet, _ = _controlnet_models("concat")
    vqvae = VQVAE(spatial_dims=2, in_channels=1, out_channels=1, num_channels=(4,), num_res_layers=1,
                  num_res_channels=4, downsample_parameters=(2, 4, 1, 1), upsample_parameters=(2, 4, 1, 1, 0),
                  num_embeddings=8, embedding_dim=1).eval()
    inferer = ControlNetLatentDiffusionInferer(DDPMScheduler(num_train_timesteps=10), scale_factor=1.0)
    images, noise = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        prediction = inferer(images, vqvae, unet, controlnet, noise, torch.tensor([2]), torch.randn(1, 1, 16, 16),
                             condition=torch.randn(1, 1, 8, 8), mode="concat")
    assert prediction.shape == (1, 1, 8, 8)


def test_023_error_types_and_paths_kept():
    from generative.utils.ordering import OrderingType as FromOrdering

    assert FromOrdering is OrderingType
    for kwargs in (dict(method="none"), dict(n_stages=-1)):
        with pytest.raises(AssertionError):  # 0.2.3 used assert
            SpatialRescaler(**kwargs)
