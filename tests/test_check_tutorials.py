"""GenerativeModels/tools/check_tutorials.py: the tutorial checker behind the fork's compatibility table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import REPO


def _checker():
    spec = importlib.util.spec_from_file_location("check_tutorials", REPO / "GenerativeModels" / "tools" / "check_tutorials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_checker_binds_builds_and_flags(tmp_path: Path):
    tutorial = tmp_path / "t" / "tutorial.py"
    tutorial.parent.mkdir()
    tutorial.write_text(
        "from generative.networks.schedulers import DDPMScheduler\n"
        "from generative.networks.nets.spade_network import SPADE_Net\n"
        "scheduler = DDPMScheduler(num_train_timesteps=10, schedule='linear_beta')\n"
        "scheduler.set_timesteps(num_inference_steps=5)\n"
        "scheduler.set_timesteps(steps=5)\n"
        "bad = DDPMScheduler(num_train_timesteps=10, beta_schedule='linear')\n"
        "scheduler.no_such_method()\n"
    )
    checker = _checker()
    lines = checker.check(tutorial)
    text = "\n".join(lines)
    assert "import generative.networks.schedulers.DDPMScheduler: ok" in text
    assert "SPADE_Net: FAILS" in text
    assert "line 3: DDPMScheduler(0 positional; num_train_timesteps,schedule): ok, built" in text
    assert "line 4: scheduler.set_timesteps [DDPMScheduler.set_timesteps](0 positional; num_inference_steps): ok" in text
    assert "line 5: scheduler.set_timesteps" in text and "steps" in [l for l in lines if "line 5" in l][0]
    assert "FAILS" in [l for l in lines if "line 5" in l][0]
    assert "FAILS to build: TypeError" in [l for l in lines if "line 6" in l][0]
    assert "no such attribute" in [l for l in lines if "line 7" in l][0]
    assert checker.main(["check_tutorials.py", str(tmp_path)]) == 1
