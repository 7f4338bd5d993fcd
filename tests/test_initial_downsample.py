"""``initial_downsample_factor`` (patchify input, inverse at the output) and ``use_conv_downsample`` (average pooling).

The central property: no input voxel is skipped. The gradient of the encoder's output with respect to every input
voxel is non-zero, whereas a kernel-3 convolution with stride 4 (the seed system's initial downsample) leaves voxels
that never reach the network.
"""

from __future__ import annotations

import math

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F

from generative.networks.nets import AutoencoderKL
from generative.networks.nets.autoencoderkl import Downsample, OutputUpsample
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.generate import generate_samples
from monai_diffusion.models import build_autoencoder, load_autoencoder
from monai_diffusion.settings import ConfigError, load_settings, settings_from_dict, total_downsample_factor
from monai_diffusion.stage1 import train_autoencoder
from monai_diffusion.stage2 import train_diffusion

from conftest import QUICKSTART


def small(**kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    args = dict(
        spatial_dims=3,
        num_channels=(4, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        latent_channels=2,
        norm_num_groups=4,
        downsample_factors=[2],
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    args.update(kwargs)
    return AutoencoderKL(**args)


def input_gradient(fn, shape) -> torch.Tensor:
    """|d <w, fn(x)> / dx| for random x and random weights w: zero exactly where a voxel cannot reach the output."""
    torch.manual_seed(1)
    x = torch.randn(1, 1, *shape, requires_grad=True)
    out = fn(x)
    (out * torch.randn_like(out)).sum().backward()
    return x.grad.abs()[0, 0]


# ------------------------------------------------------------------------------------------------ no skipping
@pytest.mark.parametrize("initial", [2, 3, 4, [4, 4, 2]])
@pytest.mark.parametrize("use_conv_downsample", [True, False])
def test_every_input_voxel_reaches_the_latent(initial, use_conv_downsample):
    model = small(initial_downsample_factor=initial, use_conv_downsample=use_conv_downsample)
    shape = tuple(2 * t for t in model.total_downsample_factor)  # 16^3, 24^3, 32^3 or 32 x 32 x 16
    grad = input_gradient(lambda x: model.encode(x)[0], shape)
    assert grad.shape == shape
    assert int((grad == 0).sum()) == 0


@pytest.mark.parametrize("initial", [2, 4, [4, 4, 2]])
def test_patchify_uses_every_voxel_exactly_once(initial):
    model = small(initial_downsample_factor=initial)
    conv = model.encoder.blocks[0].conv
    factor = model.initial_downsample_factor
    assert conv.kernel_size == conv.stride == factor and conv.padding == (0, 0, 0)
    shape = tuple(4 * f for f in factor)
    x = torch.zeros(1, 1, *shape, requires_grad=True)
    out = F.conv3d(x, torch.ones_like(conv.weight[:1]), stride=conv.stride)  # how many windows read each voxel
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x.grad))


def test_kernel3_stride4_convolution_skips_voxels():
    """The contrast: the seed's initial downsample (kernel 3, stride 4, padding 1) reads inputs 4i - 1 .. 4i + 1 for
    output i, so at least 1 of 4 voxels per axis never reaches the output (more at the far border)."""
    torch.manual_seed(0)
    seed_conv = torch.nn.Conv3d(1, 4, kernel_size=3, stride=4, padding=1)
    n = 16
    grad = input_gradient(seed_conv, (n, n, n))
    outputs = (n + 2 * 1 - 3) // 4 + 1
    reached_per_axis = torch.zeros(n, dtype=torch.bool)
    for i in range(outputs):
        reached_per_axis[max(0, 4 * i - 1) : 4 * i + 2] = True
    expected = reached_per_axis[:, None, None] & reached_per_axis[None, :, None] & reached_per_axis[None, None, :]
    assert torch.equal(grad > 0, expected)
    skipped = int((grad == 0).sum())
    assert skipped >= n**3 - (3 * n // 4) ** 3  # at least 1 - (3/4)^3 = 58% of the volume has no influence


# -------------------------------------------------------------------------------------------- shapes, layers
@pytest.mark.parametrize("use_convtranspose", [False, True])
@pytest.mark.parametrize("initial", [2, [4, 4, 2], [1, 2, 1]])
def test_shapes_and_total_factor(initial, use_convtranspose):
    model = small(initial_downsample_factor=initial, use_convtranspose=use_convtranspose, downsample_factors=[2])
    per_axis = (initial,) * 3 if isinstance(initial, int) else tuple(initial)
    assert model.initial_downsample_factor == per_axis
    assert model.total_downsample_factor == tuple(2 * f for f in per_axis)
    x = torch.randn(2, 1, *(4 * t for t in model.total_downsample_factor))
    with torch.no_grad():
        recon, z_mu, _ = model(x)
    assert recon.shape == x.shape
    assert z_mu.shape == model.latent_shape(x.shape) == (2, 2, 4, 4, 4)
    assert isinstance(model.decoder.blocks[-1], OutputUpsample)


def test_subpixel_output_gives_every_voxel_three_taps_per_axis():
    """The transposed-convolution output layer has no uneven overlap: with all-ones weights and input, every output
    voxel away from the border receives the same number of contributions (3 per axis and input channel)."""
    layer = OutputUpsample(3, in_channels=2, out_channels=1, use_convtranspose=True, scale_factor=(4, 4, 2))
    with torch.no_grad():
        layer.conv.conv.weight.fill_(1.0)
        layer.conv.conv.bias.zero_()
        y = layer(torch.ones(1, 2, 5, 5, 5))
    assert y.shape == (1, 1, 20, 20, 10)
    interior = y[0, 0, 4:-4, 4:-4, 2:-2]
    assert torch.all(interior == 2 * 27)


@pytest.mark.parametrize("dims,factor", [(3, (4, 4, 2)), (3, (2, 1, 3)), (2, (4, 2)), (1, (3,))])
def test_output_upsample_without_the_full_resolution_hidden_tensor_is_the_same_function(dims, factor):
    """The interpolation output layer runs as a sub-pixel convolution at the low resolution: the same output and the
    same gradients (input, weight, bias) as upsampling first and convolving, to double-precision rounding."""
    torch.manual_seed(0)
    layer = OutputUpsample(dims, in_channels=5, out_channels=2, use_convtranspose=False, scale_factor=factor).double()
    x = torch.randn(2, 5, *(6, 5, 4)[:dims], dtype=torch.double, requires_grad=True)

    def reference(inp):
        return layer.conv(F.interpolate(inp, scale_factor=tuple(float(f) for f in factor), mode="nearest"))

    expected = reference(x)
    out = layer(x)
    assert out.shape == expected.shape == (2, 2, *(n * f for n, f in zip((6, 5, 4), factor)))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    g = torch.randn_like(expected)
    wanted = [x, layer.conv.conv.weight, layer.conv.conv.bias]
    ours = torch.autograd.grad((out * g).sum(), wanted)
    for a, b in zip(ours, torch.autograd.grad((reference(x) * g).sum(), wanted)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_output_upsample_holds_no_tensor_larger_than_its_output():
    """What makes the seed's remote config sample in 0.25 GiB instead of 5 GiB: with 8 channels in and 1 out at
    factor 4, the old path built an 8-channel full-resolution tensor (8x the output); now nothing exceeds the output."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    layer = OutputUpsample(3, in_channels=8, out_channels=1, use_convtranspose=False, scale_factor=4)
    x = torch.randn(1, 8, 12, 12, 12)
    with torch.no_grad(), Record():
        y = layer(x)
    assert y.shape == (1, 1, 48, 48, 48)
    assert max(sizes) == y.numel()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast: the weight sums stay in fp32
        low = layer(x).float()
    torch.testing.assert_close(low, y, rtol=0.05, atol=0.05)


def test_average_pooling_downsample():
    layer = Downsample(3, 4, stride=(4, 2, 1), use_conv=False)
    assert sum(p.numel() for p in layer.parameters()) == 0
    x = torch.randn(1, 4, 8, 8, 8)
    torch.testing.assert_close(layer(x), x.reshape(1, 4, 2, 4, 4, 2, 8, 1).mean(dim=(3, 5, 7)))
    conv_model, pool_model = small(downsample_factors=[4]), small(downsample_factors=[4], use_conv_downsample=False)
    conv_params = sum(p.numel() for p in conv_model.encoder.blocks[2].parameters())
    assert conv_params > 0
    assert sum(p.numel() for p in conv_model.parameters()) - sum(p.numel() for p in pool_model.parameters()) == conv_params


# ------------------------------------------------------------------------------------------------ defaults
def test_defaults_are_todays_model():
    legacy = small()
    explicit = small(initial_downsample_factor=1, use_conv_downsample=True)
    assert repr(legacy) == repr(explicit)
    assert legacy.init_args == explicit.init_args
    assert "initial_downsample_factor" not in legacy.init_args and "use_conv_downsample" not in legacy.init_args
    a, b = legacy.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("initial_factor" in k for k in a)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(legacy.reconstruct(x), explicit.reconstruct(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ state dicts
def test_init_args_rebuild_the_model():
    source = small(initial_downsample_factor=[4, 4, 2], use_conv_downsample=False, use_convtranspose=True)
    assert source.init_args["initial_downsample_factor"] == [4, 4, 2]
    assert source.init_args["use_conv_downsample"] is False
    model = AutoencoderKL(**source.init_args)
    model.load_state_dict(source.state_dict())
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), source.reconstruct(x))


@pytest.mark.parametrize("saved, target", [(1, 2), (2, 1), (2, 4), ([2, 2, 1], 2)])
def test_state_dict_with_another_initial_factor_is_refused(saved, target):
    source, model = small(initial_downsample_factor=saved), small(initial_downsample_factor=target)
    with pytest.raises(ValueError, match="initial_downsample_factor differs"):
        model.load_state_dict(source.state_dict())
    # the decoder with interpolation has the legacy weight shapes: only the recorded factor tells them apart
    with pytest.raises(ValueError, match="final_upsample_factor differs"):
        model.decoder.load_state_dict(source.decoder.state_dict(), strict=False)


@pytest.mark.parametrize("value, match", [(0, ">= 1"), ([2, 2], "one factor per spatial axis"), ("2", "integer")])
def test_bad_initial_factor_is_refused(value, match):
    with pytest.raises(ValueError, match=f"initial_downsample_factor.*{match}"):
        small(initial_downsample_factor=value)


# ------------------------------------------------------------------------------------------------ settings
def _settings(**autoencoder):
    return settings_from_dict({"autoencoder": autoencoder, "data": {"voxel_size": [32, 32, 16],
                                                                    "synthetic": {"enabled": True}}})


def test_settings_total_factor_includes_the_initial_factor():
    s = _settings(initial_downsample_factor=[2, 2, 1], downsample_factors=[2, 2], use_conv_downsample=False)
    assert total_downsample_factor(s.autoencoder) == (8, 8, 4)
    model = build_autoencoder(s.autoencoder)
    assert model.total_downsample_factor == (8, 8, 4)
    assert not model.encoder.blocks[2].use_conv


def test_settings_refuse_sizes_not_divisible_by_the_total_factor():
    with pytest.raises(ConfigError, match="data.voxel_size: axis 2: 16 is not divisible by 32.*initial_downsample"):
        _settings(initial_downsample_factor=8)
    with pytest.raises(ConfigError, match="autoencoder.initial_downsample_factor: expected an integer or a list of "
                                          "spatial_dims = 3"):
        _settings(initial_downsample_factor=[2, 2])
    with pytest.raises(ConfigError, match="autoencoder.initial_downsample_factor: must be >= 1"):
        _settings(initial_downsample_factor=0)


def test_checkpoint_round_trip_through_the_app(tmp_path):
    """One epoch of stage 1 with both options; the checkpoint rebuilds the same model from itself alone, and stage 2
    and sampling, which rebuild it from the checkpoint, work on its (initial x levels) latent."""
    overrides = [
        "data.train_data_dir=null", "data.val_data_dir=null", "data.datalist=null",
        "data.synthetic={enabled: true, num_train: 2, num_val: 1, seed: 0}",
        "data.voxel_size=[16, 16, 16]", "data.crop_mode=resize", "data.cache_rate=1.0", "data.cache_dir=null",
        "data.num_workers=0",
        "autoencoder.num_channels=[4, 8, 8]", "autoencoder.norm_num_groups=4", "autoencoder.latent_channels=2",
        "autoencoder.attention_levels=[false, false, false]",
        "autoencoder.initial_downsample_factor=[2, 2, 1]", "autoencoder.use_conv_downsample=false",
        "autoencoder.training.batch_size=2", "autoencoder.training.n_epochs=1",
        "autoencoder.training.adv_weight=0", "autoencoder.training.use_perceptual_loss=false",
        f"autoencoder.checkpoints.output_dir={tmp_path / 'ae'}", "autoencoder.checkpoints.resume_from=null",
        "autoencoder.logging.log_dir=null",
        "diffusion.in_channels=2", "diffusion.out_channels=2", "diffusion.num_channels=[8]",
        "diffusion.attention_levels=[false]", "diffusion.num_head_channels=8", "diffusion.norm_num_groups=4",
        "diffusion.scheduler.num_train_timesteps=20", "diffusion.training.n_epochs=1",
        "diffusion.training.batch_size=2", "diffusion.training.num_samples_to_generate=0",
        "diffusion.training.cache_latents=false",
        f"diffusion.checkpoints.autoencoder_path={tmp_path / 'ae' / 'best_model.pt'}",
        f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}",
        "sampling.num_inference_steps=2", "sampling.num_samples=1", f"sampling.output_dir={tmp_path / 'samples'}",
        "device.use_cuda=false", "device.mixed_precision=false",
    ]
    settings = load_settings(QUICKSTART, overrides)
    train_autoencoder(settings)
    model, ckpt = load_autoencoder(tmp_path / "ae" / "best_model.pt")
    assert ckpt["model_args"]["initial_downsample_factor"] == [2, 2, 1]
    assert ckpt["model_args"]["use_conv_downsample"] is False
    assert model.total_downsample_factor == (8, 8, 4)
    assert ckpt["state_dict"]["autoencoder"]["encoder.initial_factor"].tolist() == [2, 2, 1]
    fresh = build_autoencoder(settings.autoencoder)
    fresh.load_state_dict(ckpt["state_dict"]["autoencoder"])
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), fresh.eval().reconstruct(x))
    assert math.prod(model.latent_shape((16, 16, 16))) == 2 * 2 * 4

    train_diffusion(settings)
    assert load_checkpoint(tmp_path / "dm" / "best_model.pt", "diffusion")["latent_shape"] == [2, 2, 2, 4]
    samples = [p for p in generate_samples(settings) if p.name.endswith(".nii.gz")]
    assert len(samples) == 1 and nib.load(samples[0]).shape == (16, 16, 16)


def test_plan_geometry_starts_the_levels_after_the_initial_factor():
    from monai_diffusion.plan.geometry import stage1_info

    info = stage1_info(_settings(initial_downsample_factor=[2, 2, 1]), batch=1)
    assert info["total_factor"] == [8, 8, 4]
    assert [lv["spatial"] for lv in info["levels"]] == [[16, 16, 16], [8, 8, 8], [4, 4, 4]]
    assert info["latent_shape"] == [1, 3, 4, 4, 4]
