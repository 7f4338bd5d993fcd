"""VQ-VAE stage 1 (autoencoder.type: vq, or the seed's top-level vqvae: section): settings, codebook usage, training
with exact resume, and stage 2 / sampling on its latents."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import VQVAE

from monai_diffusion.cli import evaluate_main, generate_samples_main, train_autoencoder_main, train_diffusion_main
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.models import code_usage, encode_to_latent, latent_channels, load_autoencoder, total_factor
from monai_diffusion.settings import (
    AutoencoderTrainingSettings,
    ConfigError,
    load_settings,
    settings_from_dict,
    total_downsample_factor,
)
from monai_diffusion.stage1 import codebook_is_untrained, init_codebook_from_data, train_autoencoder

from conftest import QUICKSTART, cli_args, tiny_overrides

NUM_EMBEDDINGS = 16


def args(root: Path, *extra: str) -> list[str]:
    """A 16^3 VQ-VAE (factor 4, 16 codes of 4 channels) and a two-level UNet on its 4^3 latent."""
    sets = tiny_overrides(
        root,
        "autoencoder.type=vq",
        "autoencoder.vqvae={num_channels: [4, 8], num_res_channels: 4, num_res_layers: 1, "
        f"num_embeddings: {NUM_EMBEDDINGS}, embedding_dim: 4}}",
        "autoencoder.training.n_epochs=2",
        "autoencoder.training.autoencoder_warm_up_n_epochs=1",
        "autoencoder.training.adv_weight=0.01",  # the adversarial path on from epoch 2
        "autoencoder.logging.log_interval=1",
        "diffusion.in_channels=4",
        "diffusion.out_channels=4",
        "diffusion.scheduler.num_train_timesteps=20",
        "diffusion.training.n_epochs=1",
        "sampling.num_inference_steps=2",
        "sampling.num_samples=2",
        "sampling.batch_size=2",
        *extra,
        # the KL autoencoder's keys stay quickstart's
        leave=("autoencoder.num_channels", "autoencoder.downsample_factors", "autoencoder.attention_levels",
               "autoencoder.norm_num_groups", "autoencoder.latent_channels"),
    )
    return cli_args(QUICKSTART, sets)


def settings(root: Path, *extra: str):
    a = args(root, *extra)
    return load_settings(a[1], a[3::2])


# ------------------------------------------------------------------------------------------------------ settings
def seed_config() -> dict:
    """The network, training, checkpoint and logging keys of the seed's vq_ldm_config_local.yaml as written there
    (its data section reduced to voxel_size)."""
    cfg = {
        "seed": 42,
        "device": {"use_cuda": True, "gpu_id": 0, "mixed_precision": True},
        "data": {"voxel_size": [96, 96, 48]},
        "vqvae": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
            "num_channels": [64, 128, 256], "num_res_channels": 256, "num_res_layers": 2,
            "num_embeddings": 256, "embedding_dim": 32,
            "downsample_parameters": [[2, 4, 1, 1], [2, 4, 1, 1], [2, 4, 1, 1]],
            "upsample_parameters": [[2, 4, 1, 1, 0], [2, 4, 1, 1, 0], [2, 4, 1, 1, 0]],
            "training": {"n_epochs": 100, "batch_size": 2, "learning_rate": 1.0e-4, "val_interval": 10,
                         "save_interval": 10, "fast_dev_run": False, "fast_dev_run_batches": 2},
            "checkpoints": {"output_dir": "outputs/vq_ldm/vqvae_checkpoints", "resume_from": None},
            "logging": {"log_dir": "outputs/vq_ldm/vqvae_logs", "log_interval": 10, "visualize_interval": 2,
                        "num_visualize_samples": 4},
        },
        "diffusion": {
            "spatial_dims": 3, "in_channels": 32, "out_channels": 32, "num_channels": [128, 256],
            "attention_levels": [False, True], "num_head_channels": [0, 64], "num_res_blocks": 2,
            "scheduler": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0015,
                          "beta_end": 0.0195},
            "training": {"n_epochs": 500, "learning_rate": 1.0e-4, "batch_size": 2, "val_interval": 10,
                         "save_interval": 25, "fast_dev_run": True, "fast_dev_run_batches": 2},
            "checkpoints": {"output_dir": "outputs/vq_ldm/diffusion_checkpoints",
                            "vqvae_path": "outputs/vq_ldm/vqvae_checkpoints/best_model.pt", "resume_from": None},
        },
    }
    if "loss" in {f.name for f in dataclasses.fields(AutoencoderTrainingSettings)}:  # the seed-parity loss keys
        cfg["vqvae"]["training"]["loss"] = {"reconstruction_loss_type": "combined",
                                            "combined": {"dice_weight": 0.5, "foreground_weight": 100.0}}
    return cfg


def test_seed_vqvae_section_maps_onto_autoencoder_vq():
    s = settings_from_dict(seed_config(), check_paths=False)
    ae = s.autoencoder
    assert ae.type == "vq" and ae.vqvae.num_embeddings == 256 and ae.vqvae.embedding_dim == 32
    assert ae.vqvae.downsample_parameters == ((2, 4, 1, 1),) * 3
    assert ae.training.n_epochs == 100 and ae.training.adv_weight == 0.0  # the seed trained without a discriminator
    assert ae.checkpoints.output_dir == "outputs/vq_ldm/vqvae_checkpoints"
    assert ae.logging.visualize_interval == 2
    assert s.diffusion.checkpoints.autoencoder_path == "outputs/vq_ldm/vqvae_checkpoints/best_model.pt"
    assert total_downsample_factor(ae) == (8, 8, 8)
    # the result is plain schema: it saves and loads back without the seed's names
    again = settings_from_dict(s.to_dict(), check_paths=False)
    assert again == s and "vqvae" not in s.to_dict() and s.to_dict()["autoencoder"]["type"] == "vq"


@pytest.mark.parametrize("change, key", [
    (lambda c: c["vqvae"].update(downsample_parameters=[[2, 4, 1, 1]] * 2),
     r"vqvae.downsample_parameters: expected len\(autoencoder.vqvae.num_channels\) = 3"),
    (lambda c: c["vqvae"].update(upsample_parameters=[[2, 4, 1, 1]] * 3),
     r"vqvae.upsample_parameters\[0\]: expected 5 integers"),
    (lambda c: c["vqvae"].update(downsample_parameters=[[2, 4, 1, 2]] * 3),
     r"vqvae.downsample_parameters\[0\]: padding 2 .* use padding 1"),
    (lambda c: c["vqvae"].update(upsample_parameters=[[2, 4, 1, 1, 0], [2, 4, 1, 1, 0], [1, 3, 1, 1, 0]]),
     "vqvae.upsample_parameters: strides multiply to 4"),
    (lambda c: c["vqvae"].update(num_res_channels=[8, 8]),
     "vqvae.num_res_channels: expected an integer or one entry per level"),
    (lambda c: c["diffusion"].update(in_channels=3),
     r"diffusion.in_channels: must equal autoencoder.vqvae.embedding_dim \(32\).*--set diffusion.in_channels=32"),
    (lambda c: c["data"].update(voxel_size=[96, 96, 44]), "data.voxel_size: axis 2: 44 is not divisible by 8"),
    (lambda c: c["vqvae"].update(num_embedings=8), "vqvae.num_embedings: .*did you mean 'num_embeddings'"),
    (lambda c: c.update(autoencoder={"training": {"n_epochs": 1}}), "vqvae.training: is given twice"),
    (lambda c: c.update(autoencoder={"type": "kl"}), "autoencoder.type: a top-level vqvae section"),
    (lambda c: c["diffusion"]["checkpoints"].update(autoencoder_path="a.pt"), "diffusion.checkpoints.vqvae_path"),
])
def test_bad_vq_settings_are_refused_naming_the_key(change, key):
    cfg = seed_config()
    change(cfg)
    with pytest.raises(ConfigError, match=key):
        settings_from_dict(cfg, check_paths=False)


def test_problems_of_a_seed_file_name_its_keys_as_written(tmp_path):
    cfg = seed_config()
    cfg["vqvae"]["training"]["n_epochs"] = 0
    cfg["vqvae"]["num_res_layers"] = True
    path = tmp_path / "vq_ldm_config_local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_settings(path, check_paths=False)
    assert {k for k, _ in err.value.problems} == {"vqvae.training.n_epochs", "vqvae.num_res_layers"}
    assert str(path) in str(err.value)
    # --set reaches the folded keys by their names here
    s = load_settings(path, ["autoencoder.training.n_epochs=3", "autoencoder.vqvae.num_res_layers=1"],
                      check_paths=False)
    assert s.autoencoder.training.n_epochs == 3 and s.autoencoder.vqvae.num_res_layers == 1


def test_vq_type_in_our_own_schema_and_its_defaults():
    s = settings_from_dict({"autoencoder": {"type": "vq"}, "diffusion": {"in_channels": 32, "out_channels": 32}},
                           check_paths=False)
    assert s.autoencoder.vqvae.num_channels == (64, 128, 256) and total_downsample_factor(s.autoencoder) == (8, 8, 8)
    with pytest.raises(ConfigError, match="sampling.tile_size: exact tiled encoding and decoding is for the KL autoencoder"):
        settings_from_dict({"autoencoder": {"type": "vq"}, "diffusion": {"in_channels": 32, "out_channels": 32},
                            "sampling": {"tile_size": [32, 32, 32]}}, check_paths=False)


def test_plan_refuses_the_vq_vae_with_one_line(tmp_path, capsys):
    from monai_diffusion.plan import plan_main

    assert plan_main([*args(tmp_path), "--no-measure"]) == 2
    assert "autoencoder.type: the plan describes and measures the KL autoencoder only" in capsys.readouterr().err


def test_code_usage_on_known_histograms():
    assert code_usage(torch.zeros(2, 4, 4, dtype=torch.long), 16) == (pytest.approx(1.0), 1 / 16)
    assert code_usage(torch.arange(16).repeat(3), 16) == (pytest.approx(16.0), 1.0)
    # two codes, three to one: exp(entropy) between 1 and 2
    perplexity, used = code_usage(torch.tensor([0, 0, 0, 5]), 8)
    assert perplexity == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))) and used == 2 / 8
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        code_usage(torch.tensor([0, 7]), 4)


def test_codebook_from_data_starts_where_the_latents_are():
    torch.manual_seed(0)
    vq = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), num_res_layers=1, num_res_channels=4,
               downsample_parameters=((2, 4, 1, 1),) * 2, upsample_parameters=((2, 4, 1, 1, 0),) * 2,
               num_embeddings=NUM_EMBEDDINGS, embedding_dim=4)
    images = torch.rand(2, 1, 16, 16, 16)
    assert codebook_is_untrained(vq)
    before = code_usage(vq.index_quantize(images), NUM_EMBEDDINGS)[1]
    init_codebook_from_data(vq, images)
    assert not codebook_is_untrained(vq)
    codes = vq.quantizer.quantizer.embedding.weight
    with torch.no_grad():
        flat = vq.encode(images).movedim(1, -1).reshape(-1, 4)
    # every code lies within its noise (1 % of the latents' std) of a latent vector, and the codes are distinct
    noise = 0.01 * flat.std(dim=0).norm()
    assert torch.cdist(codes, flat).min(dim=1).values.max() < 5 * noise
    assert torch.pdist(codes).min() > 0
    after = code_usage(vq.index_quantize(images), NUM_EMBEDDINGS)[1]
    assert after > before, (before, after)
    # decoding a generated latent quantises it first; tiled decoding is refused, naming the key
    from monai_diffusion.sampling import decode_latents

    vq.eval()  # (in training mode quantising moves the codebook)
    with torch.no_grad():
        z = torch.randn(1, 4, 4, 4, 4)
        assert torch.equal(decode_latents(vq, z, 2.0, None), vq.decode(vq.quantize(z / 2.0)[0]))
    with pytest.raises(ConfigError, match="sampling.tile_size: .*tiled (encoding and )?decoding is for the KL autoencoder"):
        decode_latents(vq, z, 1.0, (8, 8, 8))


# ----------------------------------------------------------------------------------------------------- training
def test_stage1_fast_dev_run_writes_nothing(tmp_path, capsys):
    assert train_autoencoder_main([*args(tmp_path), "--fast-dev-run"]) == 0
    out = capsys.readouterr().out
    assert "codebook of 16 codes" in out and "perplexity" in out
    assert not (tmp_path / "ae").exists() or not any((tmp_path / "ae").rglob("*.pt"))


def test_seed_config_file_runs_stage1_fast_dev_run(tmp_path, capsys):
    """The seed's VQ-VAE as written (channels 64/128/256, 256 codes of 32 channels, its parameter lists) from a YAML
    file, on small built-in volumes instead of its data folders."""
    cfg = seed_config()
    cfg["data"] = {"synthetic": {"enabled": True, "num_train": 2, "num_val": 1}, "voxel_size": [16, 16, 16]}
    cfg["device"]["mixed_precision"] = False  # fp32 on the CPU (the seed's true means bf16 here)
    cfg["vqvae"]["checkpoints"]["output_dir"] = str(tmp_path / "vqvae_checkpoints")
    cfg["vqvae"]["logging"]["log_dir"] = str(tmp_path / "vqvae_logs")
    path = tmp_path / "vq_ldm_config_local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_autoencoder_main(["--config", str(path), "--fast-dev-run"]) == 0
    out = capsys.readouterr().out
    assert "latent (2, 32, 2, 2, 2)" in out and "codebook of 256 codes" in out
    assert not any(tmp_path.rglob("*.pt"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    sd = load_checkpoint(path)["state_dict"]
    return {f"{m}.{k}": v for m in sorted(sd) for k, v in sd[m].items()}


def test_stage1_resume_is_exact_and_logs_codebook_usage(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_autoencoder(settings(full))
    train_autoencoder(settings(part, "autoencoder.training.n_epochs=1"))
    train_autoencoder(settings(part, f"autoencoder.checkpoints.resume_from={part / 'ae' / 'latest_checkpoint.pt'}"))
    a, b = _weights(full / "ae" / "latest_checkpoint.pt"), _weights(part / "ae" / "latest_checkpoint.pt")
    assert a.keys() == b.keys() and any("ema_w" in k for k in a)  # the codebook's EMA state is in the checkpoint
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # perplexity and the fraction of codes used, in the log of every epoch, within their ranges
    log = (full / "ae" / "train.log").read_text()
    for name, low, high in (("perplexity", 1.0, NUM_EMBEDDINGS), ("codes_used", 1 / NUM_EMBEDDINGS, 1.0)):
        values = [float(v) for v in re.findall(rf"\btrain_{name}=([0-9.e+-]+)", log)]
        assert len(values) == 2 and all(low - 1e-6 <= v <= high + 1e-6 for v in values), (name, values)
        assert re.search(rf"\bval_{name}=", log)
    # and in TensorBoard
    events = list((full / "ae" / "logs").rglob("events.out.tfevents.*"))
    assert events and any(b"train/perplexity" in e.read_bytes() for e in events)


def test_stage2_and_sampling_on_vq_latents(tmp_path, capsys):
    train_autoencoder(settings(tmp_path, "autoencoder.training.n_epochs=1"))
    model, ckpt = load_autoencoder(tmp_path / "ae" / "best_model.pt")  # from the checkpoint alone
    assert isinstance(model, VQVAE) and ckpt["model_args"]["num_embeddings"] == NUM_EMBEDDINGS
    assert latent_channels(model) == 4 and total_factor(model) == (4, 4, 4)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        z, sigma = encode_to_latent(model, x)
        # the latent stage 2 learns from is the quantised one: every latent voxel is its code's vector
        codes = model.quantizer.embed(model.index_quantize(x))
    # (equal up to rounding: the straight-through estimator computes z + (code - z))
    assert z.shape == (1, 4, 4, 4, 4) and torch.allclose(z, codes, atol=1e-6) and not sigma.any()

    assert train_diffusion_main([*args(tmp_path), "--fast-dev-run"]) == 0
    assert not (tmp_path / "dm").exists() or not any((tmp_path / "dm").rglob("*.pt"))
    assert train_diffusion_main(args(tmp_path)) == 0
    dm = load_checkpoint(tmp_path / "dm" / "best_model.pt")
    assert dm["latent_shape"] == [4, 4, 4, 4] and dm["autoencoder"]["model_args"]["embedding_dim"] == 4
    assert 0 < dm["scale_factor"] < float("inf")
    assert generate_samples_main(args(tmp_path)) == 0
    samples = sorted((tmp_path / "samples").glob("*.nii.gz"))
    assert len(samples) == 2
    import nibabel as nib

    volume = nib.load(samples[0]).get_fdata()
    assert volume.shape[:3] == (16, 16, 16) and volume.std() > 0
    # evaluate: stage-1 figures from the VQ-VAE's reconstructions of the validation volumes
    report = tmp_path / "evaluation.json"
    assert evaluate_main([*args(tmp_path), "--num-samples", "4", "--c2st-epochs", "0", "--out", str(report)]) == 0
    stage1 = json.loads(report.read_text())["stage1_validation"]
    # the same volumes through the same VQ-VAE as stage 1's validation: the same L1
    assert stage1["count"] == 2 and stage1["l1"] == pytest.approx(ckpt["best_metric"], rel=1e-4)


def test_two_process_gloo_vq_run_draws_its_pictures_instead_of_hanging(tmp_path):
    """Only rank 0 draws pictures. validate() leaves the modules in train mode, and MONAI's EMA quantizer updates its
    codebook in train mode with an all-reduce across ranks: a picture pass in train mode left rank 0 in a collective
    that rank 1 never joined (NCCL hangs; gloo here aborted at the next mismatched collective). The picture pass runs
    in eval mode (no codebook update), so both ranks finish; a hang fails at the timeout."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = args(tmp_path, "autoencoder.training.n_epochs=1", "autoencoder.training.batch_size=1",
                "autoencoder.training.adv_weight=0.0", "autoencoder.logging.visualize_interval=1",
                f"autoencoder.logging.log_dir={tmp_path / 'logs'}")
    script = Path(__file__).resolve().parents[1] / "monai_diffusion" / "3d_ldm" / "train_autoencoder.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script),
           *argv]
    # its own process group, so that a hang is ended with the launcher's workers, not left behind
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError("the 2-process VQ-VAE run hung at its picture epoch: " + out[-2000:]) from None
    assert proc.returncode == 0, out[-4000:]
    assert "processes: 2" in out
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))  # the pictures went to TensorBoard
    assert load_checkpoint(tmp_path / "ae" / "latest_checkpoint.pt")["epoch"] == 0  # the one epoch (0-based)
