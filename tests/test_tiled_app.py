"""The app's uses of exact tiled encoding and decoding (``autoencoder.tile_size``, ``sampling.tile_size``): stage 2's
encoding and latent cache, sampling, evaluate's reconstructions and stage 1's whole-volume validation give the numbers
of the whole-volume pass; bad tile sizes are refused before any work, naming the key."""

from __future__ import annotations

import pytest
import torch

from generative.networks.nets import AutoencoderKL
from monai_diffusion.cli import train_diffusion_main
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.evaluation.pipeline import _reconstruct
from monai_diffusion.generate import Sampler
from monai_diffusion.models import decode_latent, encode_to_latent, reconstruct
from monai_diffusion.settings import ConfigError, load_settings
from monai_diffusion.stage2 import train_diffusion

from conftest import QUICKSTART, cli_args, error_line, tiny_factor4 as tiny  # 16^3, factor 4 (see autoencoder_run)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.std())


def _kl(**kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    args = dict(spatial_dims=3, in_channels=1, out_channels=1, num_channels=(4, 8, 8), latent_channels=2,
                attention_levels=(False, False, True), num_res_blocks=1, norm_num_groups=4,
                downsample_factors=[(2, 2, 1), (2, 2, 2)])
    args.update(kwargs)
    return AutoencoderKL(**args).eval()


# ----------------------------------------------------------------------------------------------------- models
def test_model_interface_in_tiles_equals_the_whole_pass():
    """encode_to_latent / decode_latent / reconstruct with a tile that does not divide the volume (anisotropic
    factors, attention at the last level) give the whole-volume numbers."""
    ae = _kl()
    x = torch.rand(1, 1, 24, 20, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z_mu, z_sigma = encode_to_latent(ae, x)
        whole = ae.decode(z_mu)
        recon = reconstruct(ae, x)
    t_mu, t_sigma = encode_to_latent(ae, x, tile_size=(8, 8, 4))
    assert t_mu.shape == z_mu.shape and _rel(t_mu, z_mu) < 1e-4 and _rel(t_sigma, z_sigma) < 1e-4
    assert _rel(decode_latent(ae, z_mu, tile_size=[8, 8, 4]), whole) < 1e-4
    assert _rel(reconstruct(ae, x, tile_size=(16, 12, 8)), recon) < 1e-4


def test_model_interface_refuses_tiles_for_the_vq_vae():
    from monai.networks.nets import VQVAE

    vq = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 4), num_res_channels=(4, 4),
               num_res_layers=1, downsample_parameters=((2, 4, 1, 1),) * 2, upsample_parameters=((2, 4, 1, 1, 0),) * 2,
               num_embeddings=8, embedding_dim=2).eval()
    with pytest.raises(ValueError, match=r"tile size \[8, 8, 8\]: exact tiled .* KL autoencoder"):
        reconstruct(vq, torch.rand(1, 1, 16, 16, 16), tile_size=[8, 8, 8])


def test_evaluate_reconstructs_larger_volumes_in_exact_tiles():
    """evaluate's reconstructions of volumes larger than the tile: the whole-volume pass, not blended windows."""
    ae = _kl(attention_levels=(False, False, False))
    vols = [torch.rand(1, 24, 16, 12, generator=torch.Generator().manual_seed(2)),
            torch.rand(1, 8, 8, 4, generator=torch.Generator().manual_seed(3))]
    out = _reconstruct(ae, vols, (8, 8, 4), torch.device("cpu"), "test volumes", clip=False)
    with torch.no_grad():
        for v, r in zip(vols, out):
            assert r.shape == v.shape and _rel(r, ae.reconstruct(v[None])[0]) < 1e-4


# ----------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("key, value, extra, message", [
    ("autoencoder.tile_size", "[16, 16]", (), r"expected 3 sizes \(one per spatial axis\), got \[16, 16\]"),
    ("autoencoder.tile_size", "[16, 18, 16]", (), r"axis 1: 18 is not divisible by 4 .*sizes are 16 and 20"),
    ("autoencoder.tile_size", "[16, 16, 0]", (), ">= 1"),
    ("sampling.tile_size", "[6, 8, 8]", (), r"axis 0: 6 is not divisible by 4"),
    ("autoencoder.tile_size", "[16, 16, 16]", ("autoencoder.type=vq",), r"KL autoencoder; the VQ-VAE runs whole"),
    ("sampling.tile_size", "[16, 16, 16]", ("diffusion.space=pixel", "diffusion.in_channels=1",
                                            "diffusion.out_channels=1"), r"diffusion.space is pixel"),
])
def test_bad_tile_sizes_are_refused_naming_the_key(tmp_path, key, value, extra, message):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', r'[.]')}.*{message}"):
        load_settings(QUICKSTART, tiny(tmp_path, *extra, f"{key}={value}"))


def test_bad_tile_size_is_one_error_line_before_any_work(tmp_path, capsys):
    args = cli_args(QUICKSTART, tiny(tmp_path, "autoencoder.tile_size=[16, 10, 16]"))
    line = error_line(capsys, train_diffusion_main(args))
    assert "autoencoder.tile_size" in line and "axis 1: 10 is not divisible by 4" in line
    assert not (tmp_path / "dm").exists()


# ----------------------------------------------------------------------------------------------------- runs
def test_stage2_encodes_and_caches_latents_in_exact_tiles(autoencoder_run, tmp_path, monkeypatch):
    """With autoencoder.tile_size the cached latents come from encode_tiled and equal the whole-volume ones: the
    scale factor (1 / std of the training latents) and the trained UNet match the untiled run."""
    calls: list[tuple[int, ...]] = []
    original = AutoencoderKL.encode_tiled

    def spy(self, x, tile_size, *args, **kwargs):
        calls.append(tuple(tile_size))
        return original(self, x, tile_size, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode_tiled", spy)
    runs = {}
    for name, extra in (("whole", ()), ("tiled", ("autoencoder.tile_size=[8, 8, 8]",))):
        settings = load_settings(QUICKSTART, tiny(autoencoder_run, *extra, "diffusion.training.n_epochs=1",
                                                  f"diffusion.checkpoints.output_dir={tmp_path / name}"))
        train_diffusion(settings)
        runs[name] = load_checkpoint(tmp_path / name / "best_model.pt")
    assert calls and set(calls) == {(8, 8, 8)}  # only the tiled run, always with its tile
    assert runs["tiled"]["scale_factor"] == pytest.approx(runs["whole"]["scale_factor"], rel=1e-4)


def test_sampling_decodes_in_exact_tiles_with_autoencoder_tile_size(autoencoder_run, tmp_path):
    """sampling.tile_size null takes autoencoder.tile_size; the samples equal the whole-volume decoding's."""
    out = f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}"
    settings = load_settings(QUICKSTART, tiny(autoencoder_run, out, "sampling.num_inference_steps=3"))
    train_diffusion(settings)
    path = tmp_path / "dm" / "best_model.pt"
    whole = Sampler(settings, path)
    tiled_settings = load_settings(QUICKSTART, tiny(autoencoder_run, out, "sampling.num_inference_steps=3",
                                                    "autoencoder.tile_size=[8, 8, 8]"))
    tiled = Sampler(tiled_settings, path)
    assert whole.tile_size is None and tuple(tiled.tile_size) == (8, 8, 8)
    a, b = whole.sample(2, seed=5), tiled.sample(2, seed=5)
    assert a.shape == b.shape == (2, 1, 16, 16, 16)
    assert _rel(b, a) < 1e-4


def test_tiled_passes_show_a_progress_bar_and_give_the_same_numbers(capsys):
    """A long tiled decode says how far it is (tile passes, growing as GroupNorm passes are discovered)."""
    ae = _kl()
    z = torch.randn(1, 2, 6, 5, 3, generator=torch.Generator().manual_seed(4))
    quiet = ae.decode_tiled(z, tile_size=(8, 8, 4))
    capsys.readouterr()
    shown = decode_latent(ae, z, tile_size=(8, 8, 4), progress=True)
    assert torch.equal(quiet, shown)
    err = capsys.readouterr().err
    assert "tiled decode" in err and ("tile/s" in err or "s/tile" in err) and "GroupNorm statistics" in err


def test_tiled_encode_under_bf16_autocast_is_as_close_to_fp32_as_the_untiled_one():
    """Stage 2 encodes under the run's autocast: the tiled pass (GroupNorm statistics gathered in fp32 or better)
    stays as close to the fp32 result as bf16 lets the untiled pass be."""
    ae = _kl(attention_levels=(False, False, False))
    x = torch.rand(1, 1, 32, 24, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = ae.encode(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            untiled = ae.encode(x)[0].float()
            tiled = encode_to_latent(ae, x, tile_size=(16, 8, 8))[0].float()
    assert torch.isfinite(tiled).all()
    assert _rel(tiled, ref) < 2 * _rel(untiled, ref) + 0.02
