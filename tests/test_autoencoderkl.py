"""Tests of the fork's AutoencoderKL with per-level, per-axis factors."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL as CoreAutoencoderKL

import generative.networks.nets.autoencoder_blocks as autoencoder_blocks
import generative.networks.nets.autoencoderkl as autoencoderkl
from generative.networks.nets import AutoencoderKL, Decoder, Encoder
from generative.networks.nets.autoencoder_blocks import AttentionBlock
from generative.networks.nets.autoencoderkl import Downsample, Upsample, normalize_factors
from generative.networks.nets.tiled import run_tiled

LEGACY_FIXTURE = Path(__file__).parent / "data" / "legacy_aekl_0_2_3.pt"

SMALL = dict(
    in_channels=1,
    out_channels=1,
    num_channels=(4, 8, 8),
    attention_levels=(False, False, True),
    num_res_blocks=1,
    latent_channels=2,
    norm_num_groups=4,
)

FACTOR_CASES = {
    "none": (None, (4, 4, 4)),
    "4_2": ([4, 2], (8, 8, 8)),
    "8_2": ([8, 2], (16, 16, 16)),
    "4_4": ([4, 4], (16, 16, 16)),
    "aniso": ([(2, 2, 1), (4, 4, 2)], (8, 8, 2)),
}


def small(spatial_dims: int = 3, **kwargs) -> AutoencoderKL:
    args = dict(SMALL, spatial_dims=spatial_dims)
    args.update(kwargs)
    return AutoencoderKL(**args)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("case", list(FACTOR_CASES))
def test_shapes(spatial_dims, case):
    factors, total = FACTOR_CASES[case]
    if factors is not None and spatial_dims == 2:
        factors = [f[:2] if isinstance(f, tuple) else f for f in factors]
    total = total[:spatial_dims]
    model = small(spatial_dims, downsample_factors=factors)
    size = (32, 32, 16)[:spatial_dims]
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        recon, z_mu, z_sigma = model(x)
    expected_latent = tuple(s // t for s, t in zip(size, total))
    assert recon.shape == x.shape
    assert z_mu.shape == z_sigma.shape == (2, 2, *expected_latent)
    assert model.total_downsample_factor == total
    assert model.latent_shape(size) == expected_latent
    assert model.latent_shape(x.shape) == (2, 2, *expected_latent)


def test_upsample_factors_default_to_reversed_downsample():
    model = small(3, downsample_factors=[(2, 2, 1), (4, 4, 2)])
    assert model.downsample_factors == ((2, 2, 1), (4, 4, 2))
    assert model.upsample_factors == ((4, 4, 2), (2, 2, 1))
    explicit = small(3, downsample_factors=[4, 2], upsample_factors=[4, 2])
    assert explicit.upsample_factors == ((4, 4, 4), (2, 2, 2))


@pytest.mark.parametrize("use_convtranspose", [False, True])
@pytest.mark.parametrize("factors", [None, [4, 2], [(2, 2, 1), (2, 2, 2)]])
def test_gradients_reach_every_parameter(use_convtranspose, factors):
    torch.manual_seed(0)
    model = small(3, downsample_factors=factors, use_convtranspose=use_convtranspose, use_checkpointing=True)
    x = torch.randn(1, 1, 16, 16, 8)
    recon, z_mu, z_sigma = model(x)
    loss = (recon - x).abs().mean() + z_mu.pow(2).mean() + z_sigma.mean()
    loss.backward()
    unused = {"proj_attn"}  # 0.2.3 creates the attention output projection but never applies it
    for name, param in model.named_parameters():
        if any(u in name for u in unused):
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("use_convtranspose", [False, True])
def test_checkpointing_gives_the_same_gradients(use_convtranspose):
    torch.manual_seed(0)
    plain = small(3, downsample_factors=[4, 2], use_convtranspose=use_convtranspose)
    ckpt = small(3, downsample_factors=[4, 2], use_convtranspose=use_convtranspose, use_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    grads = []
    for model in (plain, ckpt):
        z_mu, _ = model.encode(x)
        (model.decode(z_mu) - x).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(downsample_factors=[2]), "`downsample_factors` must have len(num_channels) - 1 = 2 entries"),
        (dict(downsample_factors=[2, 2, 2]), "got 3: [2, 2, 2]"),
        (dict(downsample_factors=[2, 0]), "`downsample_factors[1]` = 0: every factor must be >= 1"),
        (dict(downsample_factors=[2, -4]), "`downsample_factors[1]` = -4"),
        (dict(downsample_factors=[2.5, 2]), "`downsample_factors[0]` = 2.5 must be an integer"),
        (dict(downsample_factors=[2.0, 2]), "`downsample_factors[0]` = 2.0 must be an integer"),
        (dict(downsample_factors=["2", 2]), "`downsample_factors[0]` = '2' must be an integer"),
        (dict(downsample_factors=[True, 2]), "`downsample_factors[0]` = True must be an integer"),
        (dict(downsample_factors=[(2, 2), 2]), "`downsample_factors[0]` = (2, 2) must have one factor per spatial axis (3)"),
        (dict(downsample_factors=[(2, 2, 1.5), 2]), "`downsample_factors[0]` = (2, 2, 1.5) must contain integers only"),
        (dict(downsample_factors=4), "`downsample_factors` must be a list with one factor per level"),
        (dict(upsample_factors=[2]), "`upsample_factors` must have len(num_channels) - 1 = 2 entries"),
        (dict(upsample_factors=[(2, 2), 2]), "`upsample_factors[0]` = (2, 2)"),
        (dict(downsample_factors=[4, 2], upsample_factors=[2, 2]), "multiply to (4, 4, 4) per axis"),
    ],
)
def test_invalid_factors_raise_at_construction(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        small(3, **kwargs)
    assert fragment in str(err.value)


def test_encoder_and_decoder_validate_their_factors():
    common = dict(spatial_dims=3, num_res_blocks=(1, 1), norm_num_groups=4, norm_eps=1e-6)
    common.update(attention_levels=(False, False), num_channels=(4, 4))
    with pytest.raises(ValueError, match=r"`downsample_factors\[0\]` = 0"):
        Encoder(in_channels=1, out_channels=2, downsample_factors=[0], **common)
    with pytest.raises(ValueError, match=r"`upsample_factors` must have len\(num_channels\) - 1 = 1"):
        Decoder(in_channels=2, out_channels=1, upsample_factors=[2, 2], **common)


def test_other_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="norm_num_groups"):
        small(3, num_channels=(4, 6, 8))
    with pytest.raises(ValueError, match="attention_levels"):
        small(3, attention_levels=(False, True))
    with pytest.raises(ValueError, match="num_res_blocks"):
        small(3, num_res_blocks=(1, 1))


@pytest.mark.parametrize(
    "factors, shape, fragment",
    [
        ([4, 2], (1, 1, 32, 30, 32), "axis 1 has size 30"),
        ([4, 2], (1, 1, 32, 30, 32), "use a multiple of 8 (e.g. 24 or 32)"),
        ([(2, 2, 1), (2, 2, 2)], (1, 1, 16, 16, 5), "axis 2 has size 5"),
        ([(2, 2, 1), (2, 2, 2)], (1, 1, 16, 16, 5), "total downsample factor 2 of that axis"),
        (None, (1, 1, 12, 16, 18), "axis 2 has size 18"),
        ([8, 2], (1, 1, 8, 16, 16), "e.g. 16)"),
    ],
)
def test_indivisible_input_is_a_clear_error(factors, shape, fragment):
    model = small(3, downsample_factors=factors)
    with pytest.raises(ValueError) as err:
        model(torch.randn(shape))
    assert fragment in str(err.value)
    with pytest.raises(ValueError):
        model.latent_shape(shape[2:])


def test_wrong_rank_or_channels_is_a_clear_error():
    model = small(3)
    with pytest.raises(ValueError, match="expects a 5D input"):
        model(torch.randn(1, 16, 16, 16))
    with pytest.raises(ValueError, match="expects 1 input channels"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="Decoder expects a latent of shape"):
        model.decode(torch.randn(1, 3, 4, 4, 4))


# ------------------------------------------------------------------------------------------- voxel coverage
@pytest.mark.parametrize("stride", [2, 3, 4, 8, (4, 2, 1), (8, 1, 2)])
def test_downsample_reaches_every_voxel_and_divides_exactly(stride):
    layer = Downsample(spatial_dims=3, in_channels=1, stride=stride)
    x = torch.randn(1, 1, 24, 24, 24, requires_grad=True)
    out = layer(x)
    strides = stride if isinstance(stride, tuple) else (stride,) * 3
    assert out.shape[2:] == tuple(24 // s for s in strides)
    out.sum().backward()
    # every input voxel influences the output (a kernel-3, stride-4 conv would leave every fourth voxel unused)
    assert int((x.grad == 0).sum()) == 0


@pytest.mark.parametrize("use_convtranspose", [False, True])
@pytest.mark.parametrize("scale", [2, 4, 8, (4, 2, 1)])
def test_upsample_multiplies_exactly_and_every_output_voxel_gets_input(scale, use_convtranspose):
    layer = Upsample(spatial_dims=3, in_channels=1, use_convtranspose=use_convtranspose, scale_factor=scale)
    with torch.no_grad():
        layer.conv.conv.weight.fill_(1.0)
        layer.conv.conv.bias.zero_()
    out = layer(torch.ones(1, 1, 3, 3, 3))
    scales = scale if isinstance(scale, tuple) else (scale,) * 3
    assert out.shape[2:] == tuple(3 * s for s in scales)
    assert int((out == 0).sum()) == 0


# --------------------------------------------------------------------------------- legacy and MONAI core parity
def _core_kwargs(**extra):
    args = dict(SMALL, spatial_dims=3)
    args["channels"] = args.pop("num_channels")
    args.update(extra)
    return args


@pytest.mark.parametrize("include_fc", [False, True])
@pytest.mark.parametrize("use_combined_linear", [False, True])
def test_matches_monai_core_for_default_factors(include_fc, use_combined_linear):
    torch.manual_seed(0)
    core = CoreAutoencoderKL(**_core_kwargs(include_fc=include_fc, use_combined_linear=use_combined_linear)).eval()
    ours = small(3, include_fc=include_fc).eval()
    ours.load_state_dict(core.state_dict())  # converts MONAI core keys
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.reconstruct(x), core.reconstruct(x), rtol=0, atol=1e-5)
        for a, b in zip(ours.encode(x), core.encode(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_monai_core_with_trained_output_projection_is_refused_without_include_fc():
    core = CoreAutoencoderKL(**_core_kwargs(include_fc=True))
    with pytest.raises(ValueError, match="build this model with include_fc=True"):
        small(3).load_state_dict(core.state_dict())
    core_no_fc = CoreAutoencoderKL(**_core_kwargs(include_fc=False))
    with pytest.raises(ValueError, match="build this model with include_fc=False"):
        small(3, include_fc=True).load_state_dict(core_no_fc.state_dict())


def test_monai_core_convtranspose_checkpoint_is_refused_clearly():
    core = CoreAutoencoderKL(**_core_kwargs(use_convtranspose=True))
    with pytest.raises(ValueError, match="use_convtranspose=True"):
        small(3, use_convtranspose=True, include_fc=True).load_state_dict(core.state_dict())


@pytest.mark.parametrize("case", ["3d_attention", "2d_convtranspose"])
def test_loads_monai_generative_0_2_3_checkpoint_and_reproduces_outputs(case):
    fixture = torch.load(LEGACY_FIXTURE, weights_only=True)[case]
    model = AutoencoderKL(**fixture["kwargs"]).eval()
    # same module tree and keys as 0.2.3, in the same order
    assert list(model.state_dict()) == list(fixture["state_dict"])
    model.load_state_dict(fixture["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(fixture["input"]), fixture["reconstruction"], rtol=0, atol=1e-5)
        z_mu, z_sigma = model.encode(fixture["input"])
    torch.testing.assert_close(z_mu, fixture["z_mu"], rtol=0, atol=1e-5)
    torch.testing.assert_close(z_sigma, fixture["z_sigma"], rtol=0, atol=1e-5)


def test_explicit_all_two_factors_equal_the_legacy_model():
    torch.manual_seed(0)
    legacy = small(3)
    torch.manual_seed(0)
    explicit = small(3, downsample_factors=[2, (2, 2, 2)])
    assert list(legacy.state_dict()) == list(explicit.state_dict())
    for a, b in zip(legacy.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- factor mismatch
@pytest.mark.parametrize(
    "saved, target",
    [
        (None, [4, 2]),
        ([4, 2], None),
        ([4, 2], [8, 2]),
        ([(2, 2, 1), (2, 2, 2)], None),  # same kernel shapes as the legacy model, so shapes alone would not tell
        ([4, 2], [(4, 4, 2), 2]),
    ],
)
def test_state_dict_with_other_factors_is_refused(saved, target):
    source = small(3, downsample_factors=saved)
    model = small(3, downsample_factors=target)
    with pytest.raises(ValueError, match="factors differ"):
        model.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="factors differ"):
        model.load_state_dict(source.state_dict(), strict=False)


def test_state_dict_with_same_factors_round_trips(tmp_path):
    source = small(3, downsample_factors=[(4, 4, 2), 2])
    torch.save(source.state_dict(), tmp_path / "ae.pt")
    model = AutoencoderKL(**source.init_args)
    model.load_state_dict(torch.load(tmp_path / "ae.pt", weights_only=True))
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), source.reconstruct(x))


# -------------------------------------------------------------------------------------------------- attention
def test_sdpa_attention_matches_explicit_attention():
    torch.manual_seed(0)
    explicit = small(3, downsample_factors=[4, 2]).eval()
    sdpa = small(3, downsample_factors=[4, 2], use_flash_attention=True).eval()
    sdpa.load_state_dict(explicit.state_dict())
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(sdpa.reconstruct(x), explicit.reconstruct(x), rtol=1e-5, atol=1e-5)


def _previous_explicit_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The explicit attention as it was before the fix (and in 0.2.3): q @ k^T first, then the scale."""
    b, c = x.shape[:2]
    h = block.norm(x).reshape(b, c, -1).transpose(1, 2)
    q, k, v = (block._split_heads(proj(h)) for proj in (block.to_q, block.to_k, block.to_v))
    weights = torch.matmul(q, k.transpose(-1, -2)) * block.scale
    out = torch.matmul(weights.softmax(dim=-1), v).transpose(1, 2).reshape(b, -1, c)
    if block.include_fc:
        out = block.proj_attn(out)
    return out.transpose(1, 2).reshape(x.shape) + x


@pytest.mark.parametrize("num_head_channels, include_fc", [(None, False), (4, True)])
def test_explicit_attention_in_fp32_equals_the_previous_formula(num_head_channels, include_fc):
    torch.manual_seed(0)
    block = AttentionBlock(3, 16, num_head_channels=num_head_channels, norm_num_groups=4, include_fc=include_fc)
    x = torch.randn(2, 16, 4, 3, 2) * 5
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), _previous_explicit_attention(block, x))


def _overflowing_block(channels: int = 512) -> tuple[AttentionBlock, torch.Tensor]:
    """A 512-channel block whose q . k is 512 * 16^2 = 131072 for every pair: past fp16's 65504 before scaling,
    5793 after (scale 1 / sqrt(512)). Every score is equal, so the attention output is the mean of v."""
    torch.manual_seed(0)
    block = AttentionBlock(3, channels, norm_num_groups=32).eval()
    with torch.no_grad():
        for proj in (block.to_q, block.to_k):
            proj.weight.zero_()
            proj.bias.fill_(16.0)
    return block, torch.randn(1, channels, 2, 2, 2)


def test_explicit_attention_does_not_overflow_in_fp16():
    block, x = _overflowing_block()
    with torch.no_grad():
        reference = block(x)
        half = block.half()
        before = _previous_explicit_attention(half, x.half())
        after = half(x.half())
    assert not torch.isfinite(before).all(), "the test input must overflow the previous formula"
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after.float(), reference, rtol=0, atol=2e-2)


def test_explicit_attention_does_not_overflow_under_fp16_autocast():
    block, x = _overflowing_block()
    with torch.no_grad():
        reference = block(x)
        with torch.autocast("cpu", dtype=torch.float16):
            before = _previous_explicit_attention(block, x)
            after = block(x)
    assert not torch.isfinite(before).all(), "the test input must overflow the previous formula"
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after.float(), reference, rtol=0, atol=2e-2)


def test_normalize_factors_expands_ints_per_axis():
    assert normalize_factors([4, (2, 2, 1)], 2, 3) == ((4, 4, 4), (2, 2, 1))
    assert normalize_factors(None, 3, 2) == ((2, 2), (2, 2), (2, 2))


# ------------------------------------------------------------------------------------------------------ tiling
def test_run_tiled_stitches_exactly_for_a_local_chain():
    """Convolutions and nearest upsampling, every level streamed tile by tile (halos from the layers) == whole pass."""
    torch.manual_seed(0)
    blocks = [
        Convolution(3, 2, 4, strides=1, kernel_size=3, padding=1, conv_only=True),
        Upsample(3, 4, scale_factor=(4, 4, 2)),
        Convolution(3, 4, 1, strides=1, kernel_size=3, padding=1, conv_only=True),
    ]
    for block in blocks:
        block.double()
    z = torch.randn(1, 2, 8, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        full = z
        for block in blocks:
            full = block(full)
        tiled = run_tiled(blocks, z, tile=(12, 16, 4), image_shape=full.shape[2:], whole_voxels=1)
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-12)


def test_tiled_equals_untiled_when_one_tile_covers_the_volume():
    model = small(3, downsample_factors=[4, 2]).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        z_mu, _ = model.encode(x)
        full = model.decode(z_mu)
        torch.testing.assert_close(model.decode_tiled(z_mu, tile_size=(32, 32, 16)), full)
        torch.testing.assert_close(model.encode_tiled(x, tile_size=(32, 32, 16))[0], z_mu)


def test_tiled_decode_equals_untiled_whatever_the_halo():
    """Tiling is exact (halos from the layers, whole-volume GroupNorm statistics): the halo argument changes nothing."""
    torch.manual_seed(0)
    model = AutoencoderKL(
        spatial_dims=2,
        num_channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        latent_channels=2,
        norm_num_groups=4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        downsample_factors=[4],
    ).eval()
    z = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        full = model.decode(z)
        with pytest.warns(DeprecationWarning, match="`halo` is deprecated and has no effect"):
            model.enable_tiling(tile_size=128, halo=64)
        tiled = model.decode(z)
        model.disable_tiling()
        with pytest.warns(DeprecationWarning, match="removed in version 0.4.0"):
            small_halo = model.decode_tiled(z, tile_size=128, halo=0)
    assert tiled.shape == full.shape
    rel = (tiled - full).abs().max() / full.std()
    rel_no_halo = (small_halo - full).abs().max() / full.std()
    assert rel < 1e-4 and rel_no_halo < 1e-4, (float(rel), float(rel_no_halo))


def test_halo_warns_once_and_only_when_given():
    model = small(3, downsample_factors=[4, 2]).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all without `halo`
        model.enable_tiling(tile_size=8)
        with torch.no_grad():
            model.reconstruct(x)
        model.encode_tiled(x, tile_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.enable_tiling(tile_size=8, halo=8)
        with torch.no_grad():
            model.reconstruct(x)  # the tiled encode/decode of enable_tiling do not warn again
    assert [w.category for w in caught] == [DeprecationWarning]
    assert caught[0].filename == __file__  # points at the caller


def test_tiling_arguments_are_checked():
    model = small(3, downsample_factors=[4, 2])
    with pytest.raises(ValueError, match="`tile_size` .*axis 0 must be a positive multiple of the total downsample factor 8"):
        model.enable_tiling(tile_size=12)
    with pytest.raises(ValueError, match="`halo` .*multiple of the total downsample factor 8"):
        model.enable_tiling(tile_size=16, halo=4)


# ------------------------------------------------------------------------------------------------------ layout
def _imports_among_nets(name: str) -> tuple[set[str], set[str]]:
    """Modules of ``generative.networks.nets`` that module ``name`` imports at module level, and inside functions."""
    package = "generative.networks.nets."
    tree = ast.parse(Path(autoencoder_blocks.__file__).with_name(f"{name}.py").read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            absolute = package + (node.module or "") if node.level == 1 else node.module or ""
            found = {absolute[len(package):]} if absolute.startswith(package) else set()
        elif isinstance(node, ast.Import):
            found = {alias.name[len(package):] for alias in node.names if alias.name.startswith(package)}
        else:
            continue
        (top if node in tree.body else nested).update(found)
    return top, nested


def test_blocks_module_sits_below_autoencoderkl_and_tiled():
    """No import cycle and no function-local imports: blocks <- tiled <- autoencoderkl."""
    assert _imports_among_nets("autoencoder_blocks") == (set(), set())
    assert _imports_among_nets("tiled") == ({"autoencoder_blocks"}, set())
    assert _imports_among_nets("autoencoderkl") == ({"autoencoder_blocks", "tiled"}, set())


def test_block_names_stay_importable_from_autoencoderkl():
    for name in autoencoder_blocks.__all__:
        assert getattr(autoencoderkl, name) is getattr(autoencoder_blocks, name), name
    assert set(autoencoderkl.__all__) >= {"AutoencoderKL", "Encoder", "Decoder", "AttentionBlock", "ResBlock",
                                          "Downsample", "Upsample"}
    assert not hasattr(AutoencoderKL, "_run_tiles")
