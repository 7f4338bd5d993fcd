"""monai_diffusion.plan: shapes, factors, UNet fit, measured peak memory and budget advice, without training."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest

import monai_diffusion.plan as plan_module
from monai_diffusion.plan import apply_budget, format_plan, make_plan, plan_main
from monai_diffusion.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "monai_diffusion" / "config"
QUICKSTART = CONFIGS / "examples" / "quickstart.yaml"

# config -> (input spatial, latent spatial, total factor per axis, latent channels); values read from the YAMLs
SHIPPED = {
    "ldm_config.yaml": ((128, 128, 64), (32, 32, 16), (4, 4, 4), 3),
    "examples/ldm_config_8x_downsample.yaml": ((256, 256, 64), (32, 32, 8), (8, 8, 8), 3),
    "examples/ldm_config_16x_downsample.yaml": ((512, 512, 128), (32, 32, 8), (16, 16, 16), 3),
    "examples/quickstart.yaml": ((32, 32, 32), (8, 8, 8), (4, 4, 4), 3),
}

# shrink the quickstart config to a measurement of a second or so per stage on a CPU
TINY = [
    "data.voxel_size=[16, 16, 16]",
    "autoencoder.num_channels=[8, 8, 8]",
    "autoencoder.training.discriminator={num_layers_d: 2, num_channels: 8}",
    "diffusion.num_channels=[8, 8]",
    "diffusion.num_head_channels=[0, 8]",
    "device.mixed_precision=false",
]


def _load(path: Path, overrides=()):
    return load_settings(path, list(overrides), check_paths=False, require_data=False)


@pytest.fixture(scope="module")
def one_thread():
    """Measurement subprocesses inherit this: one intra-op thread keeps a loaded 2-core machine from thrashing."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def measured(one_thread):
    """One measured plan of the tiny quickstart config with a budget no network fits (0.001 GiB)."""
    settings = _load(QUICKSTART, TINY)
    return settings, make_plan(settings, measure=True, budget_gb=0.001, device="cpu")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_shapes_factors_and_fit(name):
    voxel, latent, factor, channels = SHIPPED[name]
    plan = make_plan(_load(CONFIGS / name), measure=False, device="cpu")
    s1, s2 = plan["autoencoder"], plan["diffusion"]
    assert s1["input_shape"] == [1, 1, *voxel]
    assert s1["latent_shape"] == [1, channels, *latent]
    assert s1["total_factor"] == list(factor)
    n_in, n_latent = voxel[0] * voxel[1] * voxel[2], channels * latent[0] * latent[1] * latent[2]
    assert s1["compression_ratio"] == pytest.approx(n_in / n_latent)
    assert s2["latent_shape"] == [1, channels, *latent]
    assert s2["fits"] and not s2["problems"]
    assert s1["parameters"]["autoencoder"] > 0 and s1["parameters"]["discriminator"] > 0
    assert s2["parameters"]["unet"] > 0
    assert s1["measurement"] is None and s2["measurement"] is None
    assert plan["verdicts"] == {"autoencoder": None, "diffusion": None} and plan["advice"] == []
    json.dumps(plan)  # JSON-serialisable as it is
    text = format_plan(plan)
    assert f"(1, {channels}, {latent[0]}, {latent[1]}, {latent[2]})" in text
    assert f"total factor     {factor[0]}x{factor[1]}x{factor[2]} per axis" in text
    assert "fits             yes" in text
    assert "not measured (--no-measure)" in text


def test_level_resolutions_and_attention_blocks_of_the_8x_recipe():
    plan = make_plan(_load(CONFIGS / "examples" / "ldm_config_8x_downsample.yaml"), measure=False, device="cpu")
    s1, s2 = plan["autoencoder"], plan["diffusion"]
    assert [lv["spatial"] for lv in s1["levels"]] == [[256, 256, 64], [64, 64, 16], [32, 32, 8]]
    # attention at level 2 (encoder + decoder) and the two non-local blocks, all flash: the model has 4 blocks
    assert sum(a["blocks"] for a in s1["attention"]) == 4 and all(a["flash"] for a in s1["attention"])
    # the UNet: levels 1 and 2 (1 down + 2 up blocks each) + the middle block = 7 attention blocks
    assert sum(a["blocks"] for a in s2["attention"]) == 7
    assert [lv["spatial"] for lv in s2["levels"]] == [[32, 32, 8], [16, 16, 4], [8, 8, 2]]
    assert plan["precision"] == "bf16"


def test_unet_that_does_not_fit_is_explained_with_fixes(monkeypatch):
    # settings validation rejects such a UNet (next test); settings built around it still get an exact answer
    settings = _load(QUICKSTART)
    df = dataclasses.replace(settings.diffusion, num_channels=(16, 32, 32, 32, 32), attention_levels=(False,) * 5,
                             num_head_channels=(0, 0, 0, 0, 16), in_channels=4)
    measured_stages = []

    def fake_measure(stages, *args, **kwargs):
        measured_stages.extend(stages)
        return {stage: {"ok": False, "error": "skipped by the test"} for stage in stages}

    monkeypatch.setattr(plan_module, "_measure_stages", fake_measure)
    plan = make_plan(dataclasses.replace(settings, diffusion=df), measure=True, budget_gb=1, device="cpu")
    assert measured_stages == ["autoencoder"]  # a UNet that cannot run is not measured
    s2 = plan["diffusion"]
    assert not s2["fits"]
    assert s2["required_divisor"] == 16
    assert any("diffusion.in_channels is 4" in p for p in s2["problems"])
    assert any("latent axis 0 is 8" in p and "not divisible by 16" in p for p in s2["problems"])
    fixes = " ".join(s2["fixes"])
    assert "--set diffusion.in_channels=3" in fixes
    assert "--set diffusion.num_channels=[16, 32, 32, 32]" in fixes  # 8 = 2**3: at most 4 levels
    assert "--set diffusion.num_head_channels=[0, 0, 0, 16]" in fixes
    assert "--set data.voxel_size=[64, 64, 64]" in fixes
    # the suggested level count validates
    _load(QUICKSTART, ["diffusion.num_channels=[16, 32, 32, 32]",
                       "diffusion.attention_levels=[false, false, false, false]",
                       "diffusion.num_head_channels=[0, 0, 0, 16]"])
    # nothing is measured for a UNet that cannot run, and nothing is claimed about the budget
    assert s2["measurement"]["ok"] is False and "does not fit" in s2["measurement"]["error"]
    assert plan["verdicts"]["diffusion"]["fits"] is None
    text = format_plan(plan)
    assert "fits             NO" in text and "MISMATCH" in text


def test_config_error_is_reported_with_its_key(capsys):
    # 5 levels halve the 8^3 latent 4 times: settings validation rejects it before planning
    rc = plan_main(["--config", str(QUICKSTART), "--no-measure",
                    "--set", "diffusion.num_channels=[16, 32, 32, 32, 32]",
                    "--set", "diffusion.attention_levels=[false, false, false, false, true]",
                    "--set", "diffusion.num_head_channels=[0, 0, 0, 0, 16]"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "diffusion.num_channels" in err and "divisible by 16" in err
    rc = plan_main(["--config", str(QUICKSTART), "--no-measure", "--set", "diffusion.in_channels=4"])
    assert rc == 2 and "diffusion.in_channels" in capsys.readouterr().err
    rc = plan_main(["--config", str(REPO / "missing.yaml"), "--no-measure"])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_measured_plan_of_a_tiny_config(measured):
    _, plan = measured
    for stage in ("autoencoder", "diffusion"):
        m = plan[stage]["measurement"]
        assert m["ok"], m
        assert m["peak_mib"] > 0 and m["step_mib"] >= 0 and m["static_mib"] > 0
        assert m["peak_mib"] == pytest.approx(m["static_mib"] + m["step_mib"])
        # the worker's own peak, not the planning process's (a fresh process inherits its parent's ru_maxrss)
        assert m["peak_mib"] < 1024
        assert m["step_seconds"] > 0 and m["device"] == "cpu" and m["precision"] == "fp32"
    assert set(plan["diffusion"]["measurement"]["phases"]) == {"encode", "UNet train step"}
    assert "VmHWM" in plan["measure_method"] or "ru_maxrss" in plan["measure_method"]
    text = format_plan(plan)
    assert "peak memory" in text and "step time" in text and "measure:" in text


def test_tiny_budget_gives_advice_with_valid_config_keys(measured):
    settings, plan = measured
    assert plan["verdicts"]["autoencoder"]["fits"] is False and plan["verdicts"]["diffusion"]["fits"] is False
    knobs = [a for a in plan["advice"] if a["kind"] == "knob"]
    keys = {a["key"] for a in knobs}
    assert {"device.mixed_precision", "autoencoder.training.use_gradient_checkpointing",
            "autoencoder.downsample_factors", "autoencoder.use_flash_attention", "diffusion.num_channels"} <= keys
    # knobs already set are not suggested
    assert "diffusion.training.cache_latents" not in keys or not settings.diffusion.training.cache_latents
    # every suggested change is a valid config on its own
    for a in knobs:
        if a["set"]:
            _load(QUICKSTART, [*TINY, *a["set"]])
    text = format_plan(plan)
    assert "DOES NOT FIT" in text and "Advice" in text and "--set device.mixed_precision=bf16" in text
    # the batch-size notes name the accumulation key
    notes = [a for a in plan["advice"] if a["kind"] == "note"]
    assert any("autoencoder.training.gradient_accumulation_steps=2" in a["text"] for a in notes)


def test_advice_is_tailored_to_what_is_already_set(measured):
    settings, plan = measured
    tuned = _load(QUICKSTART, [*TINY, "device.mixed_precision=bf16",
                               "autoencoder.training.use_gradient_checkpointing=true",
                               "autoencoder.use_flash_attention=true", "autoencoder.downsample_factors=[4, 1]"])
    again = copy.deepcopy(plan)
    again["precision"] = "bf16"  # what make_plan resolves for these settings on the CPU
    again = apply_budget(again, tuned, 0.001)  # re-judge the same measurements against the tuned settings
    keys = {a["key"] for a in again["advice"] if a["kind"] == "knob"}
    assert not keys & {"device.mixed_precision", "autoencoder.training.use_gradient_checkpointing",
                       "autoencoder.use_flash_attention", "autoencoder.downsample_factors"}
    assert "autoencoder.num_channels" in keys


def test_budget_that_fits_reports_headroom(measured):
    settings, plan = measured
    roomy = apply_budget(copy.deepcopy(plan), settings, 64)
    for stage in ("autoencoder", "diffusion"):
        v = roomy["verdicts"][stage]
        assert v["fits"] is True and v["headroom_mib"] == pytest.approx(64 * 1024 - v["peak_mib"])
    assert not [a for a in roomy["advice"] if a["kind"] == "knob"]
    text = format_plan(roomy)
    assert "FITS" in text and "headroom" in text and "Both stages fit" in text


def test_without_measuring_nothing_is_claimed_but_a_sure_miss(capsys):
    settings = _load(CONFIGS / "examples" / "ldm_config_8x_downsample.yaml")
    plan = make_plan(settings, measure=False, budget_gb=8, device="cpu")
    assert all(v["fits"] is None for v in plan["verdicts"].values())
    assert not [a for a in plan["advice"] if a["kind"] == "knob"]
    assert "unknown" in format_plan(plan)
    # the weights, gradients and Adam states alone (16 bytes per parameter) exceed 1 MiB: that much is certain
    plan = make_plan(settings, measure=False, budget_gb=0.001, device="cpu")
    assert all(v["fits"] is False for v in plan["verdicts"].values())
    assert {a["key"] for a in plan["advice"]} == {"autoencoder.num_channels", "diffusion.num_channels"}


def test_plan_main_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "plan.json"
    rc = plan_main(["--config", str(CONFIGS / "examples" / "ldm_config_16x_downsample.yaml"), "--no-measure",
                    "--device", "cpu", "--set", "seed=1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Stage 1: autoencoder" in text and "Stage 2: latent diffusion UNet" in text
    data = json.loads(out.read_text())
    assert data["autoencoder"]["latent_shape"] == [1, 3, 32, 32, 8]
    assert data["autoencoder"]["total_factor"] == [16, 16, 16]
    assert data["diffusion"]["fits"] is True
    assert data["config"].endswith("ldm_config_16x_downsample.yaml") and data["overrides"] == ["seed=1"]
    assert format_plan(data) == text  # the JSON holds everything the report shows


def test_bad_arguments_and_missing_cuda(capsys):
    assert plan_main(["--config", str(QUICKSTART), "--budget-gb", "0", "--no-measure"]) == 2
    assert "--budget-gb" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert plan_main(["--config", str(QUICKSTART), "--device", "cuda", "--no-measure"]) == 2
        assert "CUDA" in capsys.readouterr().err
