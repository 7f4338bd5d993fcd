"""The execution knobs device.channels_last, device.compile and mixed_precision auto: validation, what auto resolves
to (printed and recorded), channels_last giving the same numbers, torch.compile keeping checkpoints as they are and
falling back to eager when compiling fails."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

import monai_diffusion.runtime as runtime_module
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main
from monai_diffusion.engine import make_scalers, train_step
from monai_diffusion.models import build_autoencoder
from monai_diffusion.pipeline import Sampler
from monai_diffusion.runtime import Runtime, auto_knob, resolve_device_settings, resolve_precision, unwrap
from monai_diffusion.settings import load_settings
from monai_diffusion.stage1 import build_autoencoder_stage

from conftest import QUICKSTART, cli_args, error_line, tiny_overrides

CPU = torch.device("cpu")
BF16_CPU = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
PLAIN_CPU = frozenset({"avx2"})


def tiny(root: Path, *extra: str) -> list[str]:
    """The smallest run: 8^3 volumes (2 train, 1 val, one step per epoch), autoencoder [4, 4] with factor 2, UNet
    [4, 4] without attention, 20 timesteps, no pictures of samples."""
    return tiny_overrides(
        root,
        "data.synthetic={enabled: true, num_train: 2, num_val: 1, seed: 0}",
        "data.voxel_size=[8, 8, 8]",
        "autoencoder.num_channels=[4, 4]",
        "autoencoder.downsample_factors=[2]",
        "diffusion.num_channels=[4, 4]",
        "diffusion.attention_levels=[false, false]",
        "diffusion.num_head_channels=4",
        "diffusion.scheduler.num_train_timesteps=20",
        "diffusion.training.n_epochs=1",
        "diffusion.training.num_samples_to_generate=0",
        "sampling.num_inference_steps=2",
        "sampling.num_samples=2",
        "sampling.batch_size=2",
        *extra,
    )


@pytest.mark.parametrize("key", ["device.channels_last", "device.compile", "device.mixed_precision"])
def test_bad_values_are_one_error_line_naming_the_key(tmp_path, capsys, key):
    line = error_line(capsys, train_autoencoder_main(cli_args(QUICKSTART, tiny(tmp_path, f"{key}=sometimes"))))
    assert key in line and "'auto'" in line and "sometimes" in line
    assert not (tmp_path / "ae").exists()


def test_auto_rule_by_machine():
    # a CPU with native bf16 (this project's measurements): bf16 on, channels_last for the autoencoder's stage
    # only, compile off
    for stage in ("autoencoder", "diffusion"):
        assert auto_knob("mixed_precision", CPU, BF16_CPU, stage)[0] == "bf16"
        assert auto_knob("compile", CPU, BF16_CPU, stage)[0] is False
    assert auto_knob("channels_last", CPU, BF16_CPU, "autoencoder")[0] is True
    assert auto_knob("channels_last", CPU, BF16_CPU, "diffusion")[0] is False
    # a CPU without it, and CUDA (not measured): everything as before the knobs existed
    for flags in (PLAIN_CPU, frozenset()):
        assert [auto_knob(k, CPU, flags)[0] for k in ("channels_last", "compile", "mixed_precision")] == [False] * 3
    cuda = torch.device("cuda", 0)
    assert [auto_knob(k, cuda)[0] for k in ("channels_last", "compile", "mixed_precision")] == [False] * 3
    assert all(auto_knob(k, CPU, PLAIN_CPU)[1] for k in ("channels_last", "compile", "mixed_precision"))
    with pytest.raises(ValueError, match="device.use_cuda"):
        auto_knob("use_cuda", CPU)


def test_auto_is_resolved_printed_and_explicit_values_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime_module, "cpu_flags", lambda: BF16_CPU)
    s = load_settings(QUICKSTART, tiny(tmp_path, "device.mixed_precision=auto", "device.compile=false"))
    assert (s.device.channels_last, s.device.compile, s.device.mixed_precision) == ("auto", False, "auto")
    resolved, lines = resolve_device_settings(s, Runtime(CPU, None), "autoencoder")
    assert (resolved.device.channels_last, resolved.device.compile, resolved.device.mixed_precision) == (
        True, False, "bf16")
    assert [line.split(" auto:")[0] for line in lines] == ["device.channels_last", "device.mixed_precision"]
    assert "true" in lines[0] and "bf16" in lines[1]
    assert resolve_precision("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(runtime_module, "cpu_flags", lambda: PLAIN_CPU)
    assert resolve_precision("auto", CPU) is None
    unchanged, none = resolve_device_settings(dataclasses.replace(
        s, device=dataclasses.replace(s.device, channels_last=False, mixed_precision=False)), Runtime(CPU, None),
        "diffusion")
    assert none == [] and unchanged.device.channels_last is False


def _one_step(settings, channels_last: bool) -> tuple[dict[str, float], dict[str, torch.Tensor], bool]:
    """The logs and gradients of one stage-1 training step (no optimizer step), and whether the first convolution
    weight was in channels_last_3d."""
    runtime = Runtime(CPU, None, channels_last=channels_last)
    stage = build_autoencoder_stage(settings, runtime)
    images = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    with runtime.autocast():
        losses, logs = stage.training_step({"image": images}, 0)
    losses["generator"].backward()
    net = unwrap(stage.modules["autoencoder"])
    conv = next(p for p in net.parameters() if p.ndim == 5 and p.shape[1] > 1 and p.shape[2] > 1)  # unambiguous
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return logs, grads, conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()


def test_channels_last_step_gives_the_same_numbers(tmp_path):
    s = load_settings(QUICKSTART, tiny(tmp_path, "data.voxel_size=[16, 16, 16]", "autoencoder.num_channels=[4, 8]"))
    logs, grads, plain_layout = _one_step(s, False)
    logs_cl, grads_cl, cl_layout = _one_step(s, True)
    assert cl_layout and not plain_layout
    assert logs.keys() == logs_cl.keys() and grads.keys() == grads_cl.keys()
    for key in logs:
        assert logs_cl[key] == pytest.approx(logs[key], rel=1e-4, abs=1e-6), key
    for name in grads:
        torch.testing.assert_close(grads_cl[name], grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_channels_last_runs_record_and_sample_the_same(tmp_path):
    # stage 1 with channels_last true; stage 2 with auto, which is resolved, printed and recorded
    assert train_autoencoder_main(cli_args(QUICKSTART, tiny(tmp_path, "device.channels_last=true"))) == 0
    assert train_diffusion_main(cli_args(QUICKSTART, tiny(tmp_path))) == 0
    ae_config = yaml.safe_load((tmp_path / "ae" / "config.yaml").read_text())
    assert ae_config["device"]["channels_last"] is True and "channels_last" in (tmp_path / "ae" / "train.log").read_text()
    expected = auto_knob("channels_last", CPU, stage="diffusion")[0]
    dm_config = yaml.safe_load((tmp_path / "dm" / "config.yaml").read_text())
    assert dm_config["device"]["channels_last"] is expected
    assert dm_config["device"]["compile"] is auto_knob("compile", CPU, stage="diffusion")[0]
    log = (tmp_path / "dm" / "train.log").read_text()
    assert f"device.channels_last auto: {str(expected).lower()} on this cpu" in log
    # the checkpoint's tensors are in the standard layout, whatever the run trained in
    ckpt = load_checkpoint(tmp_path / "ae" / "best_model.pt", expected_stage="autoencoder")
    assert all(t.is_contiguous() for t in ckpt["state_dict"]["autoencoder"].values())
    # sampling in channels_last gives the samples of the plain layout
    samples = {}
    for flag in (False, True):
        s = load_settings(QUICKSTART, tiny(tmp_path, f"device.channels_last={str(flag).lower()}"))
        sampler = Sampler(s, tmp_path / "dm" / "best_model.pt")
        assert sampler.channels_last is flag
        samples[flag] = sampler.sample(2, seed=5, progress=False)
    torch.testing.assert_close(samples[True], samples[False], rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, capsys):
    import torch._dynamo.exc as dynamo_exc

    def broken_compile(module, **kwargs):
        def call(*args, **kw):
            raise dynamo_exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(runtime_module.torch, "compile", broken_compile)
    s = load_settings(QUICKSTART, tiny(tmp_path))
    images = {"image": torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))}
    results = []
    for compile_on in (True, False):
        runtime = Runtime(CPU, None, compile=compile_on)
        stage = build_autoencoder_stage(s, runtime)
        assert bool(stage.compiled) is compile_on
        torch.manual_seed(0)
        for step in range(2):
            logs, stepped = train_step(stage, images, 0, make_scalers(stage, runtime), runtime, global_step=step)
        results.append((logs, unwrap(stage.modules["autoencoder"]).state_dict()))
        if compile_on:
            assert stage.compiled["autoencoder"].eager
    out = capsys.readouterr().out
    assert out.count("warning: device.compile: compiling the autoencoder failed") == 1
    assert "InvalidCxxCompiler" in out and "without torch.compile" in out
    (logs_fb, state_fb), (logs_eager, state_eager) = results
    assert logs_fb == logs_eager  # the fallback redid the step: the same as a run that never compiled
    for key in state_eager:
        torch.testing.assert_close(state_fb[key], state_eager[key], rtol=0, atol=0)


def test_compiled_run_writes_plain_checkpoints_and_resumes(tmp_path):
    # the one test that really compiles (tens of seconds on a CPU): the smallest network, one step
    assert train_autoencoder_main(cli_args(QUICKSTART, tiny(tmp_path, "device.compile=true"))) == 0
    log = (tmp_path / "ae" / "train.log").read_text()
    assert log.count("device.compile: the first training step took") == 1, log
    assert "compiling the autoencoder failed" not in log
    assert yaml.safe_load((tmp_path / "ae" / "config.yaml").read_text())["device"]["compile"] is True
    ckpt = load_checkpoint(tmp_path / "ae" / "latest_checkpoint.pt", expected_stage="autoencoder")
    s = load_settings(QUICKSTART, tiny(tmp_path))
    assert list(ckpt["state_dict"]["autoencoder"]) == list(build_autoencoder(s.autoencoder).state_dict())
    assert not any("_orig_mod" in k for part in ckpt["state_dict"].values() for k in part)
    # a compiled run's checkpoint resumes (here without compiling)
    resume = tiny(tmp_path, "autoencoder.training.n_epochs=2", "autoencoder.checkpoints.resume_from=latest",
                  "device.compile=false")
    assert train_autoencoder_main(cli_args(QUICKSTART, resume)) == 0
    after = load_checkpoint(tmp_path / "ae" / "latest_checkpoint.pt", expected_stage="autoencoder")
    assert after["epoch"] == 1 and after["global_step"] == 2
