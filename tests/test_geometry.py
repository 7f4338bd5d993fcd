"""Tests of monai_diffusion.geometry: the arithmetic of sizes, checked against the networks that do it."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import VQVAE

from generative.networks.nets import AutoencoderKL
from monai_diffusion import geometry


def test_kl_total_factor_and_level_sizes_match_the_autoencoder():
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_channels": [4, 4, 4], "latent_channels": 2,
            "num_res_blocks": 1, "norm_num_groups": 2, "attention_levels": [False, False, False],
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
            "downsample_factors": [[2, 2, 1], 2], "initial_downsample_factor": [2, 1, 1]}
    net = AutoencoderKL(**args)
    total = geometry.kl_total_factor(args["initial_downsample_factor"], args["downsample_factors"], 2, 3)
    assert total == tuple(net.total_downsample_factor) == (8, 4, 2)
    sizes = geometry.level_resolutions((32, 16, 8), geometry.per_axis([2, 1, 1], 3),
                                       geometry.per_level_factors(args["downsample_factors"], 2, 3))
    assert sizes == [(16, 16, 8), (8, 8, 8), (4, 4, 4)]
    with torch.no_grad():
        z = net.encode(torch.zeros(1, 1, 32, 16, 8))[0]
    assert tuple(z.shape[2:]) == sizes[-1] == geometry.latent_shape((32, 16, 8), total)
    assert geometry.per_level_factors(None, 2, 2) == [(2, 2), (2, 2)]  # the legacy autoencoder
    assert geometry.product_per_axis([], 3) == (1, 1, 1)


def test_vq_total_factor_matches_the_vqvae():
    down, up = geometry.vq_parameters(2, None, None)
    assert down == [(2, 4, 1, 1)] * 2 and up == [(2, 4, 1, 1, 0)] * 2
    net = VQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 4), num_res_channels=4,
                num_res_layers=1, downsample_parameters=down, upsample_parameters=up, num_embeddings=8,
                embedding_dim=2)
    with torch.no_grad():
        z = net.encode_stage_2_inputs(torch.zeros(1, 1, 16, 12))
    assert tuple(z.shape[2:]) == geometry.latent_shape((16, 12), geometry.vq_total_factor(down, 2)) == (4, 3)


def test_sizes_that_do_not_divide():
    assert geometry.indivisible_axes((33, 32, 30), (4, 4, 4)) == [(0, 33, 4), (2, 30, 4)]
    with pytest.raises(ValueError, match="axis 0: 33 is not divisible by 4; axis 2: 30 is not divisible by 4"):
        geometry.latent_shape((33, 32, 30), (4, 4, 4))
    assert geometry.divided((33, 30), (4, 4)) == [8, 7]
    assert geometry.rounded_up((33, 32), (4, 4)) == [36, 32]
    assert geometry.nearest_multiples(33, 4) == [32, 36] and geometry.nearest_multiples(3, 4) == [4]
    assert geometry.nearest_multiple(34, 4) == 32 and geometry.nearest_multiple(35, 4) == 36
    assert geometry.nearest_multiple(1, 8) == 8
    assert [geometry.two_adic(n) for n in (1, 2, 12, 64)] == [0, 1, 2, 6]
    assert geometry.unet_levels_that_fit((8, 12, 4)) == 3  # 4 halves twice


def test_decode_tile_rule():
    assert geometry.decode_tile([16, 16], [32, 32]) == ((16, 16), "sampling.tile_size")
    assert geometry.decode_tile(None, [32, 32]) == ((32, 32), "autoencoder.tile_size")
    assert geometry.decode_tile(None, [32, 32], pixel=True) == (None, "sampling.tile_size")
    assert geometry.decode_tile(None, None) == (None, "sampling.tile_size")
