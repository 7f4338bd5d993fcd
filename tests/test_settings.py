"""Tests of monai_diffusion.settings: YAML -> validated settings, overrides, error messages."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from monai_diffusion.settings import (
    ConfigError,
    Settings,
    add_config_args,
    apply_overrides,
    latent_channels_of,
    load_settings,
    settings_from_args,
    settings_from_dict,
    total_downsample_factor,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "monai_diffusion" / "config"
SHIPPED = sorted([CONFIG_DIR / "ldm_config.yaml", *(CONFIG_DIR / "examples").glob("*.yaml")])
QUICKSTART = CONFIG_DIR / "examples" / "quickstart.yaml"

SYNTH = {"data": {"synthetic": {"enabled": True}}}


def _write(tmp_path: Path, text_or_dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    text = text_or_dict if isinstance(text_or_dict, str) else yaml.safe_dump(text_or_dict)
    path.write_text(text)
    return path


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _error(d: dict, check_paths: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(d, check_paths=check_paths)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ shipped configs


def test_all_expected_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"ldm_config.yaml", "ldm_config_8x_downsample.yaml", "ldm_config_16x_downsample.yaml",
            "quickstart.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_are_consistent(path):
    s = load_settings(path, check_paths=False)
    assert isinstance(s, Settings)
    pixel = s.diffusion.space == "pixel"  # the UNet takes the images (no autoencoder), else the latents
    channels = s.autoencoder.in_channels if pixel else latent_channels_of(s.autoencoder)
    assert s.diffusion.in_channels == channels == s.diffusion.out_channels
    total = (2 ** (len(s.diffusion.num_channels) - 1),) * 3 if pixel else total_downsample_factor(s.autoencoder)
    assert all(v % t == 0 for v, t in zip(s.data.voxel_size, total))
    # round trip through a plain dict and through YAML text
    assert settings_from_dict(s.to_dict(), check_paths=False) == s
    assert settings_from_dict(yaml.safe_load(s.to_yaml()), check_paths=False) == s


def test_shipped_latent_sizes():
    def latent(name):
        s = load_settings(CONFIG_DIR / name, check_paths=False)
        return tuple(v // t for v, t in zip(s.data.voxel_size, total_downsample_factor(s.autoencoder)))

    assert latent("ldm_config.yaml") == (32, 32, 16)
    assert latent("examples/ldm_config_8x_downsample.yaml") == (32, 32, 8)
    assert latent("examples/ldm_config_16x_downsample.yaml") == (32, 32, 8)
    assert latent("examples/quickstart.yaml") == (8, 8, 8)


def test_8x_recipe_is_low_memory():
    s = load_settings(CONFIG_DIR / "examples" / "ldm_config_8x_downsample.yaml", check_paths=False)
    assert s.autoencoder.downsample_factors == (4, 2)
    assert s.data.voxel_size == (256, 256, 64)
    assert s.autoencoder.use_flash_attention and s.autoencoder.training.use_gradient_checkpointing
    assert s.device.mixed_precision in (True, "bf16")
    assert s.autoencoder.attention_levels[0] is False


def test_quickstart_loads_with_path_checks():
    s = load_settings(QUICKSTART)  # synthetic data: nothing on disk needed
    assert s.data.synthetic.enabled and s.data.voxel_size == (32, 32, 32)
    # evaluate's classifier two-sample test needs at least 8 training volumes per set
    from monai_diffusion.evaluation import c2st_min_count

    assert s.data.synthetic.num_train >= c2st_min_count()
    assert s.autoencoder.checkpoints.output_dir == "runs/quickstart/autoencoder"
    assert s.diffusion.checkpoints.autoencoder_path == "runs/quickstart/autoencoder/best_model.pt"
    assert s.diffusion.checkpoints.output_dir == "runs/quickstart/diffusion"


def test_default_config_needs_its_data_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(CONFIG_DIR / "ldm_config.yaml")
    msg = str(info.value)
    assert "data.train_data_dir" in msg and "folder not found" in msg and "data/train" in msg
    assert "ldm_config.yaml" in msg  # names the file
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    assert load_settings(CONFIG_DIR / "ldm_config.yaml").data.train_data_dir == "data/train"


# ------------------------------------------------------------------------------------------------ defaults, dicts


def test_defaults_only():
    s = load_settings(None, check_paths=False)
    assert s == Settings()
    assert s.autoencoder.training.n_epochs == 100
    assert s.autoencoder.num_channels == (32, 64, 64)
    assert s.data.voxel_size == (64, 64, 64)
    assert s.seed == 42
    assert total_downsample_factor(s.autoencoder) == (4, 4, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]


def test_defaults_need_a_data_source_when_checking_paths():
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    msg = str(info.value)
    assert "no data source" in msg and "data.synthetic.enabled" in msg and "data.train_data_dir" in msg
    # tools that read no data can opt out
    assert load_settings(None, require_data=False) == Settings()


def test_to_dict_is_plain_yaml():
    d = Settings().to_dict()
    assert isinstance(d["autoencoder"]["num_channels"], list)
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert settings_from_dict(d, check_paths=False) == Settings()


def test_empty_sections_and_empty_file(tmp_path):
    assert settings_from_dict({"autoencoder": {"training": None}}, check_paths=False) == Settings()
    assert load_settings(_write(tmp_path, ""), check_paths=False) == Settings()


def test_per_axis_factors_and_total():
    s = settings_from_dict(
        {"autoencoder": {"downsample_factors": [[2, 2, 1], 2]}, "data": {"voxel_size": [64, 64, 32]}},
        check_paths=False,
    )
    assert s.autoencoder.downsample_factors == ((2, 2, 1), 2)
    assert total_downsample_factor(s.autoencoder) == (4, 4, 2)


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_key_suggests_closest(tmp_path):
    path = _write(tmp_path, {"autoencoder": {"training": {"n_epoch": 5}}})
    with pytest.raises(ConfigError) as info:
        load_settings(path, check_paths=False)
    msg = str(info.value)
    assert "autoencoder.training.n_epoch" in msg and "did you mean 'n_epochs'?" in msg
    assert info.value.key == "autoencoder.training.n_epoch"


def test_unknown_top_level_section():
    msg = _error({"autoencoderr": {}})
    assert "autoencoderr" in msg and "did you mean 'autoencoder'?" in msg


def test_section_given_a_scalar():
    msg = _error({"autoencoder": {"training": 5}})
    assert "autoencoder.training" in msg and "expected a section" in msg


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"autoencoder": {"training": {"n_epoch": 5, "batch_size": 0}}, "seed": "x"},
                           check_paths=False)
    keys = [k for k, _ in info.value.problems]
    assert keys == ["autoencoder.training.n_epoch", "autoencoder.training.batch_size", "seed"]
    assert "3 problems" in str(info.value)


@pytest.mark.parametrize(
    "d, key, fragment",
    [
        ({"autoencoder": {"training": {"n_epochs": True}}}, "autoencoder.training.n_epochs", "expected an integer"),
        ({"autoencoder": {"training": {"n_epochs": 2.5}}}, "autoencoder.training.n_epochs", "got 2.5 (float)"),
        ({"autoencoder": {"training": {"n_epochs": 2.0}}}, "autoencoder.training.n_epochs", "write 2"),
        ({"autoencoder": {"training": {"n_epochs": "10"}}}, "autoencoder.training.n_epochs", "'10' (string)"),
        ({"autoencoder": {"num_channels": 32}}, "autoencoder.num_channels", "expected a list of integers"),
        ({"autoencoder": {"num_channels": [32, "x", 64]}}, "autoencoder.num_channels[1]", "expected an integer"),
        ({"autoencoder": {"training": {"learning_rate": "fast"}}}, "autoencoder.training.learning_rate",
         "expected a number"),
        ({"autoencoder": {"training": {"learning_rate": True}}}, "autoencoder.training.learning_rate",
         "expected a number"),
        ({"autoencoder": {"use_flash_attention": 1}}, "autoencoder.use_flash_attention", "expected true or false"),
        ({"autoencoder": {"num_res_blocks": 1.5}}, "autoencoder.num_res_blocks",
         "an integer or a list of integers"),
        ({"autoencoder": {"downsample_factors": 4}}, "autoencoder.downsample_factors", "expected a list"),
        ({"data": {"train_data_dir": 5}}, "data.train_data_dir", "expected a string"),
        ({"sampling": {"num_samples": None}}, "sampling.num_samples", "got null"),
    ],
)
def test_wrong_types(d, key, fragment):
    msg = _error(d)
    assert key in msg and fragment in msg


def test_float_written_without_dot_is_accepted(tmp_path):
    # PyYAML reads 1e-4 as the string "1e-4"; float fields accept it as the number
    path = _write(tmp_path, "autoencoder:\n  training:\n    learning_rate: 1e-4\n    kl_weight: 1e-6\n")
    assert yaml.safe_load(path.read_text())["autoencoder"]["training"]["learning_rate"] == "1e-4"
    s = load_settings(path, check_paths=False)
    assert s.autoencoder.training.learning_rate == pytest.approx(1e-4)
    assert isinstance(s.autoencoder.training.learning_rate, float)
    assert s.autoencoder.training.kl_weight == pytest.approx(1e-6)
    # an int is fine for a float field
    assert settings_from_dict({"diffusion": {"training": {"learning_rate": 1}}},
                              check_paths=False).diffusion.training.learning_rate == 1.0


@pytest.mark.parametrize(
    "d, key, fragment",
    [
        ({"data": {"crop_mode": "crop"}}, "data.crop_mode", "'resize', 'pad_crop', 'random_patch'"),
        ({"data": {"on_read_error": "ignore"}}, "data.on_read_error", "'fail', 'skip'"),
        ({"device": {"mixed_precision": "fp32"}}, "device.mixed_precision", "'fp16', 'bf16'"),
        ({"sampling": {"save_format": "tiff"}}, "sampling.save_format", "'nifti'"),
        ({"sampling": {"save_format": "png"}}, "sampling.save_format", "png holds 2D images"),
        ({"diffusion": {"scheduler": {"schedule": "scaled_linear"}}}, "diffusion.scheduler.schedule",
         "did you mean 'scaled_linear_beta'?"),
        ({"diffusion": {"scheduler": {"prediction_type": "eps"}}}, "diffusion.scheduler.prediction_type",
         "'epsilon'"),
    ],
)
def test_bad_enum(d, key, fragment):
    msg = _error(d)
    assert key in msg and fragment in msg


def test_enum_case_and_mixed_precision_values():
    s = settings_from_dict({"data": {"crop_mode": "Pad_Crop"}, "device": {"mixed_precision": "BF16"}},
                           check_paths=False)
    assert s.data.crop_mode == "pad_crop" and s.device.mixed_precision == "bf16"
    assert settings_from_dict({"device": {"mixed_precision": True}}, check_paths=False).device.mixed_precision is True
    from monai_diffusion.runtime import resolve_precision

    assert resolve_precision(True, torch.device("cpu")) == torch.bfloat16
    assert resolve_precision(False, torch.device("cpu")) is None


@pytest.mark.parametrize(
    "d, key, fragment",
    [
        ({"autoencoder": {"training": {"n_epochs": 0}}}, "autoencoder.training.n_epochs", "must be >= 1, got 0"),
        ({"diffusion": {"training": {"batch_size": -1}}}, "diffusion.training.batch_size", "must be >= 1"),
        ({"autoencoder": {"training": {"gradient_accumulation_steps": 0}}},
         "autoencoder.training.gradient_accumulation_steps", ">= 1"),
        ({"autoencoder": {"num_channels": [32, 0, 64]}}, "autoencoder.num_channels[1]", ">= 1"),
        ({"data": {"voxel_size": [64, 0, 64]}}, "data.voxel_size[1]", ">= 1"),
        ({"data": {"cache_rate": 1.5}}, "data.cache_rate", "must be <= 1"),
        ({"data": {"augmentation": {"random_flip_prob": -0.1}}}, "data.augmentation.random_flip_prob", ">= 0"),
        ({"autoencoder": {"training": {"learning_rate": 0}}}, "autoencoder.training.learning_rate", "must be > 0"),
    ],
)
def test_ranges(d, key, fragment):
    msg = _error(d)
    assert key in msg and fragment in msg


@pytest.mark.parametrize(
    "d, key, fragment",
    [
        ({"data": {"voxel_size": [64, 64]}}, "data.voxel_size", "spatial_dims = 3 entries"),
        ({"autoencoder": {"attention_levels": [False, False]}}, "autoencoder.attention_levels",
         "one entry per level"),
        ({"autoencoder": {"num_res_blocks": [1, 1]}}, "autoencoder.num_res_blocks", "one entry per level"),
        ({"autoencoder": {"downsample_factors": [2, 2, 2]}}, "autoencoder.downsample_factors",
         "len(num_channels) - 1 = 2 entries"),
        ({"autoencoder": {"downsample_factors": [2, [2, 2]]}}, "autoencoder.downsample_factors[1]",
         "spatial_dims = 3 integers"),
        ({"autoencoder": {"downsample_factors": [2, 0]}}, "autoencoder.downsample_factors[1]", ">= 1"),
        ({"autoencoder": {"upsample_factors": [4, 2]}}, "autoencoder.upsample_factors",
         "must restore the input size"),
        ({"autoencoder": {"num_channels": [32, 48, 64], "attention_levels": [False] * 3}},
         "autoencoder.num_channels", "divisible by autoencoder.norm_num_groups (32)"),
        ({"diffusion": {"in_channels": 4}}, "diffusion.in_channels", "autoencoder.latent_channels (3)"),
        ({"diffusion": {"num_head_channels": [0, 32]}}, "diffusion.num_head_channels", "one entry per level"),
        ({"diffusion": {"num_head_channels": [0, 48, 32]}}, "diffusion.num_head_channels[1]", "must divide"),
        ({"diffusion": {"scheduler": {"beta_start": 0.1, "beta_end": 0.01}}}, "diffusion.scheduler.beta_start",
         "below"),
        ({"sampling": {"num_inference_steps": 2000}}, "sampling.num_inference_steps", "num_train_timesteps"),
    ],
)
def test_lengths_and_cross_field_checks(d, key, fragment):
    msg = _error(d)
    assert key in msg and fragment in msg


def test_voxel_size_not_divisible_names_axis_and_nearest_sizes():
    msg = _error({"autoencoder": {"downsample_factors": [4, 2]}, "data": {"voxel_size": [64, 64, 60]}})
    assert "data.voxel_size" in msg
    assert "axis 2: 60 is not divisible by 8" in msg
    assert "nearest valid sizes are 56 and 64" in msg
    assert "axis 0" not in msg


def test_voxel_size_per_axis_factor():
    msg = _error({"autoencoder": {"downsample_factors": [[2, 2, 1], [2, 2, 1]]}, "data": {"voxel_size": [64, 66, 33]}})
    assert "axis 1: 66 is not divisible by 4" in msg and "nearest valid sizes are 64 and 68" in msg
    assert "axis 2" not in msg


def test_diffusion_levels_must_fit_latent():
    msg = _error({"data": {"voxel_size": [64, 64, 4]}, "autoencoder": {"downsample_factors": [[2, 2, 1], [2, 2, 1]]},
                  "diffusion": {"num_channels": [64, 128, 128, 128], "attention_levels": [False, True, True, True],
                                "num_head_channels": 32}})
    assert "diffusion.num_channels" in msg and "divisible by 8" in msg and "latent axis 2 is 4" in msg
    assert "latent axis 0 is 16" not in msg


def test_data_sources():
    msg = _error({"data": {"train_data_dir": "a", "synthetic": {"enabled": True}}})
    assert "exactly one data source" in msg and "data.train_data_dir" in msg and "data.synthetic.enabled" in msg
    msg = _error({"data": {"val_data_dir": "v", "datalist": "d.json"}})
    assert "data.val_data_dir" in msg
    msg = _error({}, check_paths=True)
    assert "no data source given" in msg


def test_missing_data_folder_and_datalist(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"data": {"train_data_dir": str(missing)}})
    assert info.value.key == "data.train_data_dir"
    assert "folder not found" in str(info.value) and str(missing) in str(info.value)
    # without path checks the document is valid
    settings_from_dict({"data": {"train_data_dir": str(missing)}}, check_paths=False)

    train = tmp_path / "train"
    train.mkdir()
    ok = settings_from_dict({"data": {"train_data_dir": str(train)}})
    assert ok.data.train_data_dir == str(train)
    msg = _error({"data": {"train_data_dir": str(train), "val_data_dir": str(tmp_path / "val")}}, check_paths=True)
    assert "data.val_data_dir" in msg and str(tmp_path / "val") in msg

    msg = _error({"data": {"datalist": str(tmp_path / "list.json")}}, check_paths=True)
    assert "data.datalist" in msg and "file not found" in msg and "list.json" in msg
    (tmp_path / "list.json").write_text('{"training": []}')
    settings_from_dict({"data": {"datalist": str(tmp_path / "list.json")}})


def test_perceptual_loss_needs_local_weights(tmp_path):
    d = _merge(SYNTH, {"autoencoder": {"training": {"use_perceptual_loss": True}}})
    msg = _error(d, check_paths=False)
    assert "autoencoder.training.perceptual_weights_path" in msg
    assert "cannot be downloaded" in msg and "--set autoencoder.training.perceptual_weights_path=" in msg

    d = _merge(d, {"autoencoder": {"training": {"perceptual_weights_path": str(tmp_path / "w.pth")}}})
    settings_from_dict(d, check_paths=False)
    msg = _error(d, check_paths=True)
    assert "file not found" in msg and "w.pth" in msg
    (tmp_path / "w.pth").write_bytes(b"x")
    assert settings_from_dict(d).autoencoder.training.use_perceptual_loss


def test_medicalnet_perceptual_needs_3d():
    msg = _error({"autoencoder": {"spatial_dims": 2, "attention_levels": [False] * 3,
                                  "training": {"perceptual_network": "medicalnet_resnet10_23datasets"}},
                  "diffusion": {"spatial_dims": 2}, "data": {"voxel_size": [64, 64], "orientation": "RA"}})
    assert "autoencoder.training.perceptual_network" in msg


def test_yaml_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_settings(_write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="written twice"):
        load_settings(_write(tmp_path, "seed: 1\nseed: 2\n"), check_paths=False)


# ------------------------------------------------------------------------------------------------ overrides, CLI


def test_overrides(tmp_path):
    path = _write(tmp_path, SYNTH)
    s = load_settings(path, overrides=[
        "autoencoder.training.n_epochs=5",
        "autoencoder.downsample_factors=[4, 2]",
        "data.voxel_size=[64, 64, 32]",
        "autoencoder.training.learning_rate=1e-4",
        "device.mixed_precision=bf16",
        "autoencoder.training.grad_clip_norm=null",
        "sampling.output_dir=out dir/x=y",
    ])
    assert s.autoencoder.training.n_epochs == 5
    assert s.autoencoder.downsample_factors == (4, 2)
    assert s.data.voxel_size == (64, 64, 32)
    assert s.autoencoder.training.learning_rate == pytest.approx(1e-4)
    assert s.device.mixed_precision == "bf16"
    assert s.autoencoder.training.grad_clip_norm is None
    assert s.sampling.output_dir == "out dir/x=y"
    # overrides create missing sections and later overrides win
    s = load_settings(None, ["data.synthetic.enabled=true", "seed=1", "seed=2"])
    assert s.data.synthetic.enabled and s.seed == 2


def test_override_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(None, ["autoencoder.training.n_epoch=5"], check_paths=False)
    assert info.value.key == "autoencoder.training.n_epoch" and "did you mean 'n_epochs'?" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'autoencoder'"):
        load_settings(None, ["autoencodr.latent_channels=4"], check_paths=False)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_settings(None, ["autoencoder.training.n_epochs"], check_paths=False)
    with pytest.raises(ConfigError, match="not a section"):
        load_settings(None, ["data.voxel_size.x=3"], check_paths=False)
    # the value is validated like one from the file, and the file is named
    path = _write(tmp_path, SYNTH)
    with pytest.raises(ConfigError) as info:
        load_settings(path, ["autoencoder.training.n_epochs=true"])
    assert "autoencoder.training.n_epochs" in str(info.value) and str(path) in str(info.value)


def test_apply_overrides_does_not_mutate():
    raw = {"data": {"voxel_size": [64, 64, 64]}}
    out = apply_overrides(raw, ["data.voxel_size=[32, 32, 32]"])
    assert raw["data"]["voxel_size"] == [64, 64, 64] and out["data"]["voxel_size"] == [32, 32, 32]


def test_argparse_helpers(tmp_path):
    parser = add_config_args(argparse.ArgumentParser())
    path = _write(tmp_path, SYNTH)
    args = parser.parse_args(["--config", str(path), "--set", "seed=7", "--set", "data.voxel_size=[32, 32, 32]"])
    assert args.config == str(path) and args.set == ["seed=7", "data.voxel_size=[32, 32, 32]"]
    s = settings_from_args(args)
    assert s.seed == 7 and s.data.voxel_size == (32, 32, 32) and s.data.synthetic.enabled

    args = parser.parse_args([])
    assert args.config is None and args.set == []
    assert settings_from_args(args, check_paths=False) == Settings()

    args = parser.parse_args(["--set", "autoencoder.training.n_epoch=1"])
    with pytest.raises(ConfigError, match="n_epochs"):
        settings_from_args(args)


def test_cli_main(tmp_path, capsys):
    from monai_diffusion.settings.__main__ import main as _main

    assert _main(["--config", str(QUICKSTART)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["voxel_size"] == [32, 32, 32]
    assert _main(["--config", str(QUICKSTART), "--set", "seed=-1"]) == 2
    assert "seed" in capsys.readouterr().err


def test_configuration_reference_is_up_to_date():
    """docs/configuration.md is generated from the dataclasses; regenerate with --reference when this fails."""
    from monai_diffusion.settings import settings_reference

    doc = Path(__file__).resolve().parents[1] / "monai_diffusion" / "docs" / "configuration.md"
    assert doc.read_text().strip() == settings_reference().strip(), (
        "run: python -m monai_diffusion.settings --reference > monai_diffusion/docs/configuration.md"
    )


def test_settings_import_nothing_above_the_ground_floor():
    """The settings package (layer 2) and geometry (ground floor) import no application module above them, not even
    inside a function: checked in the source (every import statement) and by importing settings in a fresh
    interpreter."""
    import ast
    import subprocess
    import sys

    package = Path(__file__).resolve().parents[1] / "monai_diffusion"
    ground = {"errors", "fileio", "geometry", "memory"}
    allowed = {"settings": ground, "geometry": set()}
    for path in [*sorted((package / "settings").glob("*.py")), package / "geometry.py"]:
        layer = "settings" if path.parent.name == "settings" else "geometry"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                # level 1 inside settings/ is the package itself; level 2 (or 1 from geometry.py) is monai_diffusion
                app_level = 2 if layer == "settings" else 1
                if node.level < app_level:
                    continue
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                above = [n for n in names if n not in allowed[layer] and not (layer == "settings" and n == "settings")]
                assert not above, f"{path.name} imports {above} from the application (line {node.lineno})"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                app = [n for n in names if n.startswith("monai_diffusion")]
                assert not app, f"{path.name} imports {app} (line {node.lineno})"
    code = ("import sys, monai_diffusion.settings; "
            "print(sorted(m for m in sys.modules if m.startswith('monai_diffusion')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(yaml.safe_load(out))
    for name in ("sampling", "synthetic", "data", "models", "engine", "stage1", "stage2", "losses"):
        assert f"monai_diffusion.{name}" not in loaded, f"import monai_diffusion.settings loaded {name}"


def test_registries_the_schema_owns_match_their_implementations():
    """Sampler names per training objective and the synthetic dataset kinds are plain data of the settings; the
    modules that implement them use the same."""
    from typing import get_args

    from monai_diffusion import sampling, synthetic
    from monai_diffusion.settings import SAMPLERS, SamplingSettings, SchedulerSettings, SyntheticDataSettings
    from monai_diffusion.settings.schema import synthetic_params
    from monai_diffusion.settings.synthetic_kinds import KINDS, PARAMS

    from monai_diffusion.settings.load import hints as resolved

    assert sampling.SAMPLERS == SAMPLERS
    assert set(get_args(resolved(SchedulerSettings)["type"])) == set(SAMPLERS)
    samplers = {name for names in SAMPLERS.values() for name in names}
    assert set(get_args(resolved(SamplingSettings)["scheduler"])) == {"auto", *samplers}
    assert synthetic.KINDS == KINDS and synthetic.PARAMS == PARAMS
    assert set(get_args(resolved(SyntheticDataSettings)["kind"])) == set(KINDS)
    for kind in KINDS:  # the generator accepts every kind with the parameters the settings hold for it
        cfg = settings_from_dict({"data": {"synthetic": {"enabled": True, "kind": kind}}}, check_paths=False)
        assert synthetic.make_params(kind, synthetic_params(cfg.data.synthetic)) == PARAMS[kind]()


def test_training_sections_share_the_loop_keys():
    """The loop keys both training sections hold are declared once (TrainingLoopSettings) and keep each section's
    own order in the YAML and the reference."""
    from monai_diffusion.settings import (
        AutoencoderTrainingSettings,
        DiffusionTrainingSettings,
        TrainingLoopSettings,
    )

    shared = {f.name: f for f in dataclasses.fields(TrainingLoopSettings)}
    for cls in (AutoencoderTrainingSettings, DiffusionTrainingSettings):
        own = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in shared.items():
            assert own[name].default == f.default and own[name].metadata == f.metadata, (cls.__name__, name)
    names = [f.name for f in dataclasses.fields(DiffusionTrainingSettings)]
    assert names[:5] == ["n_epochs", "batch_size", "learning_rate", "val_interval", "save_interval"]
    assert [f.name for f in dataclasses.fields(AutoencoderTrainingSettings)][-1] == "max_consecutive_skips"
    with pytest.raises(ConfigError, match="diffusion.training.val_interval: must be >= 1"):
        settings_from_dict({"diffusion": {"training": {"val_interval": 0}}}, check_paths=False)
