"""Exact tiled encode/decode: tiled == untiled within 1e-4 of the output's std (fp32).

In fp32 the untiled pass is itself off its float64 value by up to ~1e-4 of the std at single voxels (the tiled one,
with float64 GroupNorm statistics, is usually closer), so fp32 is held to 1e-4 on the mean and 1e-3 on the max
difference, and the algorithm's exactness is checked in float64, where tiled and untiled agree to ~1e-14.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from generative.networks.nets import AutoencoderKL
from generative.networks.nets.tiled import run_tiled

TOL = 1e-4  # of the untiled output's standard deviation

# name: (spatial_dims, downsample_factors, volume, tile, attention_levels, use_convtranspose, non-local attention)
CASES = {
    "3d-4x2-attention": (3, [4, 2], (32, 24, 16), (16, 16, 8), (False, False, True), False, True),
    "3d-4x2-no-attention": (3, [4, 2], (32, 24, 16), (24, 16, 16), (False, False, False), False, False),
    "3d-8x2": (3, [8, 2], (32, 32, 16), (16, 16, 16), (False, False, False), False, True),
    "3d-anisotropic-convtranspose": (3, [(2, 2, 1), (4, 4, 2)], (32, 24, 16), (24, 24, 6), (False, False, True), True, True),
    "3d-anisotropic-no-attention": (3, [(2, 2, 1), (4, 4, 2)], (32, 24, 16), (32, 16, 8), (False, False, False), False, False),
    "2d-4x2-attention": (2, [4, 2], (32, 48), (24, 16), (False, True, True), False, True),
    "2d-8x2-no-attention": (2, [8, 2], (32, 48), (16, 32), (False, False, False), False, False),
    "2d-legacy-full-res-attention": (2, None, (32, 24), (12, 8), (True, False, False), True, False),
}


def build(spatial_dims, factors, attention, convtranspose, nonlocal_attn) -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(
        spatial_dims=spatial_dims,
        num_channels=(8, 16, 16),
        attention_levels=attention,
        num_res_blocks=1,
        latent_channels=3,
        norm_num_groups=4,
        downsample_factors=factors,
        use_convtranspose=convtranspose,
        with_encoder_nonlocal_attn=nonlocal_attn,
        with_decoder_nonlocal_attn=nonlocal_attn,
    ).eval()
    with torch.no_grad():  # non-trivial GroupNorm affines, so a wrong statistic cannot hide behind weight 1 / bias 0
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def rel_err(tiled: torch.Tensor, full: torch.Tensor, reduce=torch.amax) -> float:
    assert tiled.shape == full.shape
    return float(reduce((tiled - full).abs()) / full.std())


def assert_close_fp32(tiled: torch.Tensor, full: torch.Tensor) -> None:
    assert rel_err(tiled, full, torch.mean) < TOL
    assert rel_err(tiled, full) < 10 * TOL


@pytest.mark.parametrize("case", list(CASES))
def test_tiled_equals_untiled(case):
    dims, factors, volume, tile, attention, convtranspose, nonlocal_attn = CASES[case]
    model = build(dims, factors, attention, convtranspose, nonlocal_attn)
    # offset and scale so the GroupNorm statistics are far from 0 / 1
    x = 3.0 + 2.0 * torch.randn(2, 1, *volume, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z_mu, z_sigma = model.encode(x)
        y = model.decode(z_mu)
    assert any(v % t for v, t in zip(volume, tile)) or case == "3d-8x2"  # most tiles do not divide the volume
    mu_t, sigma_t = model.encode_tiled(x, tile_size=tile)
    y_t = model.decode_tiled(z_mu, tile_size=tile)
    assert_close_fp32(mu_t, z_mu)
    assert_close_fp32(sigma_t, z_sigma)
    assert_close_fp32(y_t, y)


@pytest.mark.parametrize("case", ["2d-8x2-no-attention", "3d-anisotropic-convtranspose", "2d-legacy-full-res-attention"])
def test_tiled_equals_untiled_in_float64(case):
    dims, factors, volume, tile, attention, convtranspose, nonlocal_attn = CASES[case]
    model = build(dims, factors, attention, convtranspose, nonlocal_attn).double()
    x = 3.0 + 2.0 * torch.randn(1, 1, *volume, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        z_mu, _ = model.encode(x)
        y = model.decode(z_mu)
    assert rel_err(model.encode_tiled(x, tile_size=tile)[0], z_mu) < 1e-9
    assert rel_err(model.decode_tiled(z_mu, tile_size=tile), y) < 1e-9


def test_lower_levels_streamed_too():
    """``whole_voxels=1`` streams every level (nothing but attention and the ends held whole): still exact."""
    model = build(3, [2, (2, 2, 1)], (False, False, False), False, nonlocal_attn=False)
    x = torch.randn(1, 1, 16, 12, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_mu, _ = model.encode(x)
        y = model.decode(z_mu)
    assert_close_fp32(model.encode_tiled(x, tile_size=(8, 4, 4), whole_voxels=1)[0], z_mu)
    assert_close_fp32(model.decode_tiled(z_mu, tile_size=(8, 4, 4), whole_voxels=1), y)


def decode_each_tile_alone(model: AutoencoderKL, z: torch.Tensor, tile: tuple[int, ...], halo: int) -> torch.Tensor:
    """The naive tiling: decode each latent tile with a ``halo``-voxel margin on its own and stitch the cores, so
    every GroupNorm sees one tile's statistics."""
    factor, sizes = model.total_downsample_factor, z.shape[2:]
    out = z.new_zeros((z.shape[0], model.decoder.out_channels, *(n * f for n, f in zip(sizes, factor))))
    for corner in itertools.product(*(range(0, n, t) for n, t in zip(sizes, tile))):
        lo = [max(0, c - halo) for c in corner]
        hi = [min(n, c + t + halo) for c, t, n in zip(corner, tile, sizes)]
        part = model._decode(z[(..., *(slice(a, b) for a, b in zip(lo, hi)))])
        core = [(c - a, min(t, n - c)) for c, a, t, n in zip(corner, lo, tile, sizes)]  # (offset, length), latent
        src = tuple(slice(o * f, (o + m) * f) for (o, m), f in zip(core, factor))
        dst = tuple(slice(c * f, (c + m) * f) for c, (_, m), f in zip(corner, core, factor))
        out[(..., *dst)] = part[(..., *src)]
    return out


def test_per_tile_statistics_would_be_detected():
    """The comparison can fail: running each tile on its own (per-tile GroupNorm) is far from the untiled output."""
    model = build(2, [4, 2], (False, False, False), False, nonlocal_attn=False)
    z = torch.randn(1, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.decode(z)
        per_tile = decode_each_tile_alone(model, z, tile=(2, 2), halo=1)
    assert_close_fp32(model.decode_tiled(z, tile_size=16), full)
    assert rel_err(per_tile, full) > 100 * TOL


def test_enable_tiling_routes_encode_decode_and_forward_stays_exact():
    model = build(3, [4, 2], (False, False, True), False, nonlocal_attn=True)
    x = torch.randn(1, 1, 16, 16, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model.reconstruct(x)
        model.enable_tiling(tile_size=8)
        assert model._tiling is not None
        tiled = model.reconstruct(x)
        model.disable_tiling()
    assert_close_fp32(tiled, full)


def test_tiled_pass_keeps_no_graph():
    model = build(2, [2, 2], (False, False, False), False, nonlocal_attn=False)
    z_mu, _ = model.encode_tiled(torch.randn(1, 1, 16, 16), tile_size=8)
    assert not z_mu.requires_grad


def test_bad_whole_voxels_is_refused():
    model = build(2, [2, 2], (False, False, False), False, nonlocal_attn=False)
    with pytest.raises(ValueError, match="`whole_voxels` must be a positive integer or None, got 0"):
        model.decode_tiled(torch.randn(1, 3, 4, 4), tile_size=8, whole_voxels=0)
    with pytest.raises(ValueError, match="`whole_voxels`"):
        model.enable_tiling(tile_size=8, whole_voxels=2.5)


def test_run_tiled_streams_a_bare_block_chain():
    """``run_tiled`` on the decoder blocks alone matches the decoder."""
    model = build(2, [4, 2], (False, False, False), False, nonlocal_attn=False)
    h = torch.randn(1, 3, 3, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model.decoder(h)
        tiled = run_tiled(model.decoder.blocks, h, tile=(8, 16), image_shape=(24, 40), whole_voxels=64)
    assert_close_fp32(tiled, full)


@pytest.mark.parametrize("dims, factors, volume, tile", [(2, [4, 2], (32, 48), (24, 16)), (3, [(2, 2, 1), (4, 4, 2)], (16, 8, 4), (8, 8, 2))])
def test_polyphase_upsampling_path_is_exact(dims, factors, volume, tile, monkeypatch):
    """Large tiles compute nearest-upsample + conv at low resolution (summed kernels); force that path on small ones."""
    import generative.networks.nets.tiled as tiled

    monkeypatch.setattr(tiled, "POLYPHASE_MIN_VOXELS", 0)
    model = build(dims, factors, (False, False, False), False, nonlocal_attn=False).double()
    z = torch.randn(1, 3, *(v // f for v, f in zip(volume, model.total_downsample_factor)), dtype=torch.float64)
    with torch.no_grad():
        y = model.decode(z)
    assert rel_err(model.decode_tiled(z, tile_size=tile), y) < 1e-9


# initial_downsample_factor (patchify input conv, inverse output layer) and use_conv_downsample=False (average pooling)
# name: (spatial_dims, downsample_factors, initial_downsample_factor, use_conv_downsample, volume, tile,
#        use_convtranspose)
INITIAL_CASES = {
    "3d-initial2-avgpool": (3, [2, 2], 2, False, (32, 24, 16), (16, 16, 8), False),
    "3d-initial442-conv-convtranspose": (3, [2, (2, 2, 1)], (4, 4, 2), True, (32, 48, 16), (16, 32, 8), True),
    "3d-initial4-avgpool-convtranspose": (3, [2, 2], 4, False, (48, 32, 16), (32, 16, 16), True),
    "2d-initial3-avgpool": (2, [2, 2], 3, False, (24, 60), (12, 24), False),
}


@pytest.mark.parametrize("whole_voxels", [None, 1])
@pytest.mark.parametrize("case", list(INITIAL_CASES))
def test_initial_factor_and_average_pooling_tile_exactly(case, whole_voxels):
    """Tiled == untiled in float64; ``whole_voxels=1`` streams every level, so the patchify convolution, the
    average pooling and the output layer all run tile by tile."""
    dims, factors, initial, use_conv, volume, tile, convtranspose = INITIAL_CASES[case]
    torch.manual_seed(0)
    model = AutoencoderKL(
        spatial_dims=dims, num_channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1,
        latent_channels=3, norm_num_groups=4, downsample_factors=factors, initial_downsample_factor=initial,
        use_conv_downsample=use_conv, use_convtranspose=convtranspose,
    ).double().eval()
    assert any(v % t for v, t in zip(volume, tile))  # the tiles do not divide the volume
    x = 3.0 + 2.0 * torch.randn(1, 1, *volume, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        z_mu, _ = model.encode(x)
        y = model.decode(z_mu)
    assert rel_err(model.encode_tiled(x, tile_size=tile, whole_voxels=whole_voxels)[0], z_mu) < 1e-9
    assert rel_err(model.decode_tiled(z_mu, tile_size=tile, whole_voxels=whole_voxels), y) < 1e-9


def test_tile_not_aligned_to_the_initial_factor_is_refused():
    model = AutoencoderKL(spatial_dims=2, num_channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                          norm_num_groups=4, downsample_factors=[2], initial_downsample_factor=4)
    with pytest.raises(ValueError, match="`tile_size` .*multiple of the total downsample factor 8"):
        model.encode_tiled(torch.randn(1, 1, 32, 32), tile_size=12)
