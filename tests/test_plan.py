"""monai_diffusion.plan: shapes, factors, UNet fit facts, measured peak memory and budget advice, without training."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_diffusion.cli import train_autoencoder_main
from monai_diffusion.runtime import Runtime
from monai_diffusion.plan import apply_budget, format_plan, make_plan, plan_main
from monai_diffusion.memory import CLEAN_MALLOC_ENV
from monai_diffusion.plan.measure import build_stage, measure_stage, worker_env
from monai_diffusion.settings import load_settings

from conftest import CONFIGS, QUICKSTART, REPO, tiny_any_config as tiny  # tiny: test_stage1's, shrinks any config

# config -> (input spatial, latent spatial, total factor per axis, latent channels); values read from the YAMLs
SHIPPED = {
    "ldm_config.yaml": ((128, 128, 64), (32, 32, 16), (4, 4, 4), 3),
    "examples/ldm_config_8x_downsample.yaml": ((256, 256, 64), (32, 32, 8), (8, 8, 8), 3),
    "examples/ldm_config_16x_downsample.yaml": ((512, 512, 128), (32, 32, 8), (16, 16, 16), 3),
    "examples/quickstart.yaml": ((32, 32, 32), (8, 8, 8), (4, 4, 4), 3),
}

# the 5-level UNet halves quickstart's 8^3 latent 4 times: settings validation refuses it
UNFIT = ["diffusion.num_channels=[16, 32, 32, 32, 32]", "diffusion.attention_levels=[false, false, false, false, true]",
         "diffusion.num_head_channels=[0, 0, 0, 0, 16]"]


def _load(path: Path, overrides=()):
    return load_settings(path, list(overrides), check_paths=False, require_data=False)


def _measured_config(tmp: Path) -> list[str]:
    """The tiny quickstart of test_stage1 at 32^3 with quickstart's own channels (a step peak of ~80 MiB on a CPU, so
    fast_dev_run's whole-MiB figure is exact to ~1 %), batch 1, adversarial loss on from the first epoch, and the
    explicit attention matrix (so that the advice has SDPA attention to offer)."""
    return tiny(tmp, "data.voxel_size=[32, 32, 32]", "autoencoder.num_channels=[8, 16, 16]",
                "autoencoder.use_flash_attention=false",
                "autoencoder.norm_num_groups=8", "autoencoder.training.batch_size=1",
                "autoencoder.training.autoencoder_warm_up_n_epochs=0", "device.mixed_precision=false",
                "diffusion.training.cache_latents=false", "diffusion.training.batch_size=2")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One measured plan of that config with a budget no network fits (0.001 GiB)."""
    overrides = _measured_config(tmp_path_factory.mktemp("plan"))
    settings = _load(QUICKSTART, overrides)
    return overrides, settings, make_plan(settings, measure=True, budget_gb=0.001, device="cpu")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_shapes_factors_and_fit_facts(name):
    voxel, latent, factor, channels = SHIPPED[name]
    settings = _load(CONFIGS / name)
    plan = make_plan(settings, measure=False, device="cpu")
    s1, s2 = plan["autoencoder"], plan["diffusion"]
    assert s1["input_shape"] == [1, 1, *voxel]
    assert s1["latent_shape"] == [1, channels, *latent]
    assert s1["total_factor"] == list(factor)
    n_in, n_latent = voxel[0] * voxel[1] * voxel[2], channels * latent[0] * latent[1] * latent[2]
    assert s1["compression_ratio"] == pytest.approx(n_in / n_latent)
    assert s2["latent_shape"] == [1, channels, *latent]
    levels = len(settings.diffusion.num_channels)
    assert s2["num_levels"] == levels and s2["required_divisor"] == 2 ** (levels - 1)
    assert [lv["spatial"] for lv in s2["levels"]][-1] == [n // s2["required_divisor"] for n in latent]
    assert s1["parameters"]["autoencoder"] > 0 and s1["parameters"]["discriminator"] > 0
    assert s2["parameters"]["unet"] > 0
    assert s1["measurement"] is None and s2["measurement"] is None
    assert plan["verdicts"] == {"autoencoder": None, "diffusion": None, "inference": None} and plan["advice"] == []
    assert plan["inference"]["encode_tile"] is None and plan["inference"]["measurement"] is None
    json.dumps(plan)  # JSON-serialisable as it is
    text = format_plan(plan)
    assert f"(1, {channels}, {latent[0]}, {latent[1]}, {latent[2]})" in text
    assert f"total factor     {factor[0]}x{factor[1]}x{factor[2]} per axis" in text
    assert f"each axis must be divisible by {s2['required_divisor']}: it is" in text
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


def _set_lines(message: str) -> list[str]:
    """The ``--set KEY=VALUE`` arguments of the first fix in an error message (up to the first ';' after them)."""
    fix = message.split("use 4 UNet level(s): ", 1)[1].split(";", 1)[0]
    return re.findall(r"--set (\S+=\[[^\]]*\]|\S+)", fix)


def test_unet_that_does_not_fit_is_one_error_line_with_its_fix(capsys):
    args = ["--config", str(QUICKSTART), "--no-measure"] + [a for o in UNFIT for a in ("--set", o)]
    assert plan_main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: ")
    assert "diffusion.num_channels" in lines[0] and "divisible by 16" in lines[0]
    assert "--set data.voxel_size=[64, 64, 64]" in lines[0]
    fix = _set_lines(lines[0])
    assert fix == ["diffusion.num_channels=[16, 32, 32, 32]", "diffusion.attention_levels=[false, false, false, false]",
                   "diffusion.num_head_channels=[0, 0, 0, 16]"]
    # the fix it names makes a config that plans
    assert plan_main(args + [a for o in fix for a in ("--set", o)]) == 0
    assert "4 level(s) halve it 3 time(s), so each axis must be divisible by 8: it is" in capsys.readouterr().out
    # --plan on a training command is the same plan
    assert train_autoencoder_main(["--config", str(QUICKSTART), "--plan", "--set", "diffusion.in_channels=4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--set diffusion.in_channels=3" in err[0]
    assert plan_main(["--config", str(REPO / "missing.yaml"), "--no-measure"]) == 2
    assert "not found" in capsys.readouterr().err


def test_measured_plan_of_a_tiny_config(measured):
    _, _, plan = measured
    for stage in ("autoencoder", "diffusion"):
        m = plan[stage]["measurement"]
        assert m["ok"], m
        assert m["peak_mib"] > m["static_mib"] > 0 and m["step_mib"] > 0
        assert m["peak_mib"] == pytest.approx(m["static_mib"] + m["step_mib"])
        # the worker's own peak, not the planning process's (a fresh process inherits its parent's ru_maxrss)
        assert m["peak_mib"] < 1024
        assert m["step_seconds"] > 0 and m["device"] == "cpu" and m["precision"] == "fp32"
    assert plan["autoencoder"]["measurement"]["phases"].keys() == {"train step"}
    phases = plan["diffusion"]["measurement"]["phases"]
    assert phases.keys() == {"train step", "encode"} and phases["encode"] <= phases["train step"] * 1.05
    assert "adversarial loss on" in " ".join(plan["autoencoder"]["measurement"]["notes"])
    assert "VmHWM" in plan["measure_method"] or "ru_maxrss" in plan["measure_method"]
    inference = plan["inference"]["measurement"]
    assert inference["ok"] and inference["phases"].keys() == {"encode", "decode"}, inference
    assert inference["peak_mib"] == max(inference["phases"].values()) and inference["static_mib"] > 0
    assert inference["encode_tile"] is None and inference["batch"] == settings_batch(measured)
    text = format_plan(plan)
    assert "peak memory" in text and "step time" in text and "method:" in text
    assert "Inference: the autoencoder outside training" in text and "whole (autoencoder.tile_size=null)" in text


def settings_batch(measured) -> int:
    return measured[1].sampling.batch_size


def test_inference_in_exact_tiles_is_planned_and_measured(tmp_path):
    """autoencoder.tile_size: the plan says which tiles encoding and sampling use and measures those passes."""
    settings = _load(QUICKSTART, tiny(tmp_path, "autoencoder.tile_size=[8, 8, 8]", "sampling.tile_size=[16, 8, 8]"))
    plan = make_plan(settings, measure=False, budget_gb=None, device="cpu")
    assert plan["inference"]["encode_tile"] == [8, 8, 8] and plan["inference"]["decode_tile"] == [16, 8, 8]
    text = format_plan(plan)
    assert "in exact tiles of 8x8x8 (autoencoder.tile_size)" in text
    assert "in exact tiles of 16x8x8 (sampling.tile_size)" in text
    from monai_diffusion.plan.measure import measure_inference

    result = measure_inference(settings, Runtime(torch.device("cpu"), None))
    assert result["encode_tile"] == [8, 8, 8] and result["decode_tile"] == [16, 8, 8]
    assert result["phases"]["encode"] > 0 and result["phases"]["decode"] > 0


def test_measured_peak_matches_fast_dev_run(measured):
    # fast_dev_run as a user runs it: the training command in its own process, nothing set in its environment
    overrides, _, plan = measured
    env = {k: v for k, v in worker_env().items() if k not in CLEAN_MALLOC_ENV}
    script = REPO / "monai_diffusion" / "3d_ldm" / "train_autoencoder.py"
    args = [sys.executable, str(script), "--config", str(QUICKSTART), "--fast-dev-run"]
    run = subprocess.run(args + [a for o in overrides for a in ("--set", o)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"fast_dev_run: peak memory of the last training step (\d+) MiB", run.stdout)
    assert found, "fast_dev_run printed no peak"
    fast_dev_run_mib = float(found.group(1))
    plan_mib = plan["autoencoder"]["measurement"]["peak_mib"]
    assert plan_mib == pytest.approx(fast_dev_run_mib, rel=0.10), (plan_mib, fast_dev_run_mib)


def test_stage2_step_on_cached_latents_with_conditions_is_the_real_one(tmp_path):
    # in this process: the batch a cached-latent, class- and covariate-conditioned loader gives, the real step
    settings = _load(QUICKSTART, tiny(tmp_path, "diffusion.training.cache_latents=true",
                                      "diffusion.training.ema_decay=0.5", "data.synthetic={enabled: false}",
                                      f"data.datalist={tmp_path / 'list.json'}",
                                      "diffusion.conditioning={class_key: label, num_classes: 3, "
                                      "covariate_keys: [age]}", "device.mixed_precision=false"))
    runtime = Runtime(torch.device("cpu"), None)
    stage, batch, epoch, notes = build_stage("diffusion", settings, runtime, batch=2)
    assert set(batch) == {"z_mu", "z_sigma", "label", "age"}
    assert batch["z_mu"].shape == (2, 2, 4, 4, 4)  # 16^3 / 4 per axis, autoencoder.latent_channels 2
    ema_before = [p.clone() for p in stage.ema.parameters()]
    result = measure_stage(stage, batch, epoch, runtime, steps=1)
    assert result["phases"].keys() == {"train step"}  # nothing is encoded
    assert result["peak_mib"] >= result["static_mib"] > 0
    # the stage's own EMA moved (two optimizer steps went through engine.train_step)
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, stage.ema.parameters()))
    assert any("class-conditioned" in n for n in notes) and any("EMA" in n for n in notes)


def test_tiny_budget_gives_advice_with_valid_config_keys(measured):
    overrides, settings, plan = measured
    assert plan["verdicts"]["autoencoder"]["fits"] is False and plan["verdicts"]["diffusion"]["fits"] is False
    knobs = [a for a in plan["advice"] if a["kind"] == "knob"]
    keys = {a["key"] for a in knobs}
    assert {"device.mixed_precision", "autoencoder.training.use_gradient_checkpointing",
            "autoencoder.downsample_factors", "autoencoder.use_flash_attention", "diffusion.num_channels",
            "autoencoder.tile_size"} <= keys
    tile = next(a for a in knobs if a["key"] == "autoencoder.tile_size")
    assert tile["stage"] == "inference" and tile["set"] == ["autoencoder.tile_size=[16, 16, 16]"]
    # every suggested change is a valid config on its own
    for a in knobs:
        if a["set"]:
            _load(QUICKSTART, [*overrides, *a["set"]])
    text = format_plan(plan)
    assert "DOES NOT FIT" in text and "Advice" in text and "--set device.mixed_precision=bf16" in text


def test_cache_latents_is_advised_only_when_encoding_is_the_peak_and_it_is_off(measured):
    _, settings, plan = measured
    assert not settings.diffusion.training.cache_latents
    cached = _load(QUICKSTART, [*measured[0], "diffusion.training.cache_latents=true"])

    def advised(phases: dict, s) -> bool:
        again = copy.deepcopy(plan)
        again["diffusion"]["measurement"]["phases"] = phases
        return "diffusion.training.cache_latents" in {a["key"] for a in apply_budget(again, s, 0.001)["advice"]}

    assert advised({"train step": 100.0, "encode": 99.0}, settings)
    assert not advised({"train step": 100.0, "encode": 10.0}, settings)
    assert not advised({"train step": 100.0, "encode": 99.0}, cached)  # already on


def test_batch_notes_name_the_accumulation_key(measured):
    _, _, plan = measured  # measured at batch 1; stage 1 trains at batch 1 here, stage 2 at quickstart's 2
    notes = [a["text"] for a in plan["advice"] if a["kind"] == "note"]
    assert any("diffusion.training.batch_size=1 with diffusion.training.gradient_accumulation_steps=2" in n
               for n in notes)
    assert not any("autoencoder.training" in n for n in notes)


def test_advice_is_tailored_to_what_is_already_set(measured):
    overrides, _, plan = measured
    tuned = _load(QUICKSTART, [*overrides, "device.mixed_precision=bf16",
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
    _, settings, plan = measured
    roomy = apply_budget(copy.deepcopy(plan), settings, 64)
    for stage in ("autoencoder", "diffusion", "inference"):
        v = roomy["verdicts"][stage]
        assert v["fits"] is True and v["headroom_mib"] == pytest.approx(64 * 1024 - v["peak_mib"])
    assert not [a for a in roomy["advice"] if a["kind"] == "knob"]
    text = format_plan(roomy)
    assert "FITS" in text and "headroom" in text and "Both stages and inference fit" in text


def test_cuda_fits_counts_reserved_memory_and_the_context_not_only_the_allocated_peak():
    """On CUDA the allocator's reserved memory and the CUDA context come on top of max_memory_allocated: a step
    whose allocated peak is under the budget but whose reserved memory plus the context allowance is over it does
    not fit. A fake CUDA measurement: allocated 20 GiB, reserved 22.5 GiB, budget 23 GiB (the 1 GiB allowance
    makes 23.5 GiB)."""
    from monai_diffusion.plan.advice import CUDA_CONTEXT_MIB, memory_need

    settings = _load(CONFIGS / "examples" / "ldm_config_8x_downsample.yaml")
    plan = make_plan(settings, measure=False, budget_gb=None, device="cpu")
    fake = {"ok": True, "peak_mib": 20 * 1024.0, "reserved_mib": 22.5 * 1024, "static_mib": 100.0,
            "step_mib": 20 * 1024.0 - 100, "precision": "bf16", "batch": 1, "step_seconds": 0.5,
            "first_step_seconds": 1.0, "steps": 1, "method": "torch.cuda.max_memory_allocated"}
    for stage in ("autoencoder", "diffusion"):
        plan[stage]["measurement"] = dict(fake)
    plan["inference"]["measurement"] = dict(fake, phases={"encode": 9000.0, "decode": 20 * 1024.0},
                                            seconds={"encode": 0.1, "decode": 0.2})
    assert CUDA_CONTEXT_MIB == 1024
    assert memory_need(fake)[0] == pytest.approx(23.5 * 1024)
    assert memory_need({**fake, "reserved_mib": None})[0] == 20 * 1024  # CPU: the measured peak itself
    tight = apply_budget(copy.deepcopy(plan), settings, 23)
    for stage in ("autoencoder", "diffusion", "inference"):
        v = tight["verdicts"][stage]
        assert v["fits"] is False and v["need_mib"] == pytest.approx(23.5 * 1024)
        assert v["headroom_mib"] == pytest.approx(-0.5 * 1024) and v["peak_mib"] == 20 * 1024
    assert [a for a in tight["advice"] if a["kind"] == "knob"]  # over budget: knobs are offered
    text = format_plan(tight)
    assert "DOES NOT FIT: 23.5 GiB > 23.0 GiB" in text and "1024 MiB CUDA context allowance" in text
    roomy = apply_budget(copy.deepcopy(plan), settings, 24)
    assert all(v["fits"] is True and v["headroom_mib"] == pytest.approx(0.5 * 1024)
               for v in roomy["verdicts"].values())
    # a reserved figure below the allocated one (never on a real allocator) cannot lower the need
    assert memory_need({**fake, "reserved_mib": 1.0})[0] == pytest.approx(21 * 1024)


def test_without_measuring_nothing_is_claimed_but_a_sure_miss():
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
    assert data["diffusion"]["required_divisor"] == 2 ** (len(data["diffusion"]["levels"]) - 1)
    assert data["config"].endswith("ldm_config_16x_downsample.yaml") and data["overrides"] == ["seed=1"]
    assert format_plan(data) == text  # the JSON holds everything the report shows


def test_bad_arguments_and_missing_cuda(capsys):
    assert plan_main(["--config", str(QUICKSTART), "--budget-gb", "0", "--no-measure"]) == 2
    assert "--budget-gb" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert plan_main(["--config", str(QUICKSTART), "--device", "cuda", "--no-measure"]) == 2
        assert "CUDA" in capsys.readouterr().err
