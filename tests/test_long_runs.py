"""Long runs survive anything: step checkpoints resumed bit for bit, ``resume_from: latest``, SIGTERM/SIGKILL at
random moments, non-finite losses on every rank (stop or skip), checkpoint writes that fail (ENOSPC).

The toy tests run in this process. The stage-1/stage-2 and two-process tests fork their training processes from
one warm interpreter (``Forker``) that imported torch once with one thread, so that each of the many starts costs
milliseconds instead of the seconds of a fresh import, and killing one at a random moment is cheap.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from monai_diffusion import engine
from monai_diffusion.checkpoints import find_latest_checkpoint, load_checkpoint, step_checkpoints
from monai_diffusion.engine import LoopConfig, run_loop
from monai_diffusion.errors import NonFiniteLoss, RunError
from monai_diffusion.runtime import Runtime
from monai_diffusion.settings import ConfigError, settings_from_dict

from conftest import QUICKSTART, cli_args, tiny_overrides

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX signals and os.fork")

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ a toy stage
class NoisyToy:
    """Least squares with input noise from the global RNG, so that resuming must restore the random states."""

    name = "toy"

    def __init__(self, nan_at: set[int] = frozenset(), signal_at: int | None = None,
                 sig: int = signal.SIGTERM) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.Adam(self.net.parameters(), lr=0.05)}
        self.calls = 0
        self.nan_at, self.signal_at, self.sig = nan_at, signal_at, sig

    def training_step(self, batch, epoch):
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.sig)  # as a scheduler (or Ctrl-C) would, in the middle of a step
        x, y = batch
        loss = (self.net(x + 0.1 * torch.randn_like(x)) - y).pow(2).mean()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        return {"net": loss}, {"mse": loss.item()}

    def validation_step(self, batch):
        x, y = batch
        return {"val_loss": (self.net(x) - y).pow(2).mean().item()}

    def visualize(self, batch, quick=False):
        return {}

    def describe(self, batch):
        return []

    def checkpoint_extra(self):
        return {"model_args": {}}

    def architecture(self):
        return {}

    def load_extra(self, ckpt, path):
        pass


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    return DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator())


def _toy_run(out: Path, stage: NoisyToy | None = None, **kw) -> tuple[NoisyToy, engine.LoopState]:
    stage = stage or NoisyToy()
    cfg = LoopConfig(n_epochs=kw.pop("n_epochs", 3), output_dir=out, log_dir=out / "logs", section="toy", **kw)
    state = run_loop(stage, _loader(), _loader(), cfg, Runtime(CPU, None))
    return stage, state


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_sigterm_stops_after_the_step_and_latest_resumes_bit_for_bit(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    full, _ = _toy_run(tmp_path / "full")
    # 4 batches per epoch; the signal arrives inside the 6th step (epoch 2, batch 2)
    out = tmp_path / "part"
    _, state = _toy_run(out, NoisyToy(signal_at=6), every_n_steps=5, keep_last=1)
    assert state.stopped_by == "SIGTERM" and state.exit_code == 128 + signal.SIGTERM
    assert state.global_step == 6  # the step in progress was finished
    text = capsys.readouterr().out
    assert "SIGTERM: stopped after optimizer step 6 (epoch 2, batch 2 of 4)" in text
    assert "--set toy.checkpoints.resume_from=latest" in text
    # keep_last=1 kept only the stop's checkpoint of the step checkpoints; the epoch-end one stays
    assert [s for s, _ in step_checkpoints(out)] == [6]
    assert (out / "latest_checkpoint.pt").is_file() and (out / "best_model.pt").is_file()
    assert load_checkpoint(out / "step_checkpoint_00000006.pt")["position"]["batches_done"] == 2

    resumed, state = _toy_run(out, resume_from="latest", every_n_steps=5, keep_last=1)
    assert "Resuming" in capsys.readouterr().out and state.global_step == 12 and state.stopped_by is None
    assert _same_weights(full.net, resumed.net)
    # the epoch's logged mean includes the batches done before the stop
    a = load_checkpoint(tmp_path / "full" / "latest_checkpoint.pt")["history"]
    b = load_checkpoint(out / "latest_checkpoint.pt")["history"]
    assert [h["train_mse"] for h in a] == [h["train_mse"] for h in b]
    # the loop's signal handlers are gone once it returns
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_stops_like_sigterm_with_accumulation_finishing_the_optimizer_step(tmp_path, capsys):
    # 2 batches per optimizer step: SIGINT during the 1st batch stops after the 2nd (the end of step 1)
    stage, state = _toy_run(tmp_path / "int", NoisyToy(signal_at=1, sig=signal.SIGINT), n_epochs=1,
                            gradient_accumulation_steps=2)
    assert state.stopped_by == "SIGINT" and state.exit_code == 130 and state.global_step == 1
    assert stage.calls == 2 and [s for s, _ in step_checkpoints(tmp_path / "int")] == [1]
    assert "SIGINT: stopped after optimizer step 1 (epoch 1, batch 2 of 4)" in capsys.readouterr().out


def test_latest_skips_a_truncated_checkpoint_and_names_it_when_given(tmp_path, capsys):
    out = tmp_path / "run"
    _toy_run(out, n_epochs=1, every_n_steps=1)
    (out / "latest_checkpoint.pt").unlink()
    (out / "best_model.pt").unlink()
    newest = out / "step_checkpoint_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # as a full disk or a copy cut short leaves it
    path, skipped = find_latest_checkpoint(out, "toy")
    assert path == out / "step_checkpoint_00000003.pt"
    assert len(skipped) == 1 and "step_checkpoint_00000004.pt" in skipped[0] and "truncated" in skipped[0]
    with pytest.raises(RunError, match="cannot read checkpoint .*step_checkpoint_00000004.pt"):
        _toy_run(out, n_epochs=1, resume_from=newest)
    _, state = _toy_run(out, n_epochs=1, resume_from="latest")
    assert "skipping" in capsys.readouterr().out and state.global_step == 4


def test_latest_without_a_checkpoint_is_an_error_unless_asked_to_start_fresh(tmp_path, capsys):
    with pytest.raises(RunError, match="holds no checkpoint to resume.*start_fresh_if_none"):
        _toy_run(tmp_path / "empty", n_epochs=1, resume_from="latest")
    _, state = _toy_run(tmp_path / "empty", n_epochs=1, resume_from="latest", start_fresh_if_none=True)
    assert state.global_step == 4 and "starting a new run" in capsys.readouterr().out
    # a folder holding only step checkpoints is a run too: a fresh start there is refused
    out = tmp_path / "steps"
    _toy_run(out, n_epochs=1, every_n_steps=2)
    (out / "latest_checkpoint.pt").unlink()
    (out / "best_model.pt").unlink()
    with pytest.raises(RunError, match="already holds a run.*resume_from=latest"):
        _toy_run(out, n_epochs=1)


def test_settings_accept_latest_and_check_the_new_keys():
    s = settings_from_dict({"autoencoder": {"checkpoints": {"resume_from": "latest", "start_fresh_if_none": True,
                                                            "every_n_steps": 100, "keep_last": 3}},
                            "diffusion": {"training": {"on_nonfinite": "skip", "max_consecutive_skips": 4}}},
                           check_paths=True, require_data=False)
    assert s.autoencoder.checkpoints.resume_from == "latest" and s.diffusion.training.on_nonfinite == "skip"
    with pytest.raises(ConfigError, match="start_fresh_if_none: applies only with"):
        settings_from_dict({"diffusion": {"checkpoints": {"start_fresh_if_none": True}}}, check_paths=False)
    with pytest.raises(ConfigError, match="keep_last"):
        settings_from_dict({"autoencoder": {"checkpoints": {"keep_last": 0}}}, check_paths=False)
    with pytest.raises(ConfigError, match="on_nonfinite"):
        settings_from_dict({"autoencoder": {"training": {"on_nonfinite": "ignore"}}}, check_paths=False)


def test_full_disk_keeps_the_previous_checkpoint_and_removes_the_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    writes = []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        writes.append(getattr(f, "name", f))
        if len(writes) == 4:  # the 4th checkpoint write: half of it lands, then the disk is full
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(engine.torch, "save", save_then_fill_the_disk)
    with pytest.raises(RunError) as info:
        _toy_run(out, n_epochs=1, every_n_steps=1)
    message = str(info.value)
    assert "\n" not in message and "No space left on device (ENOSPC)" in message
    assert "step_checkpoint_00000004.pt" in message
    # the three complete checkpoints are there and readable; nothing partial is left
    assert [s for s, _ in step_checkpoints(out)] == [1, 2, 3]
    assert load_checkpoint(out / "step_checkpoint_00000003.pt")["global_step"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_on_nonfinite_skip_drops_the_step_counts_it_and_stops_after_m_in_a_row(tmp_path, capsys):
    # calls 2 and 3 have a NaN loss: two optimizer steps are dropped, the rest goes on
    skipped, state = _toy_run(tmp_path / "skip", NoisyToy(nan_at={2, 3}), n_epochs=1, on_nonfinite="skip")
    out = capsys.readouterr().out
    assert state.skipped_batches == 2 and state.global_step == 2
    assert "skipped: toy: loss 'net' became nan at epoch 1, batch 3 (2 in a row, 2 in all)" in out
    assert "skipped_batches=2" in out
    assert all(torch.isfinite(p).all() for p in skipped.net.parameters())
    with pytest.raises(NonFiniteLoss, match="3 batches in a row had a non-finite loss.*max_consecutive_skips=3"):
        _toy_run(tmp_path / "many", NoisyToy(nan_at={2, 3, 4}), n_epochs=1, on_nonfinite="skip",
                 max_consecutive_skips=3)


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"loss 'net' became nan at epoch 1, batch 4.*Stopped; the last good "
                                            r"checkpoint is .*step_checkpoint_00000003.pt") as info:
        _toy_run(tmp_path / "stop", NoisyToy(nan_at={4}), n_epochs=1, every_n_steps=1)
    assert f"error: {info.value}" in (tmp_path / "stop" / "train.log").read_text()



def test_the_command_line_says_latest_found_nothing_in_one_line(tmp_path, capsys):
    from monai_diffusion.cli import train_diffusion_main

    ae = tmp_path / "ae.pt"
    ae.write_bytes(b"")  # never opened: the missing resume checkpoint is found first
    code = train_diffusion_main(_stage_args(tmp_path, f"diffusion.checkpoints.autoencoder_path={ae}",
                                            "diffusion.checkpoints.resume_from=latest"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: diffusion.checkpoints.resume_from=latest: ") and "holds no checkpoint" in err[0]
    assert not (tmp_path / "dm").exists()  # a refused run leaves nothing

# ------------------------------------------------------------------------------------ processes killed for real
FORKER = r"""
import json, os, signal, sys, time, traceback
os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1)
import monai_diffusion.cli, monai_diffusion.stage1, monai_diffusion.stage2  # what every child needs, imported once
import torch.utils.tensorboard
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (seconds)
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "start":
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.environ.update(cmd["env"])
                try:
                    exec(compile(cmd["code"], "<child>", "exec"), {"__name__": "__child__"})
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 0
                except BaseException:
                    traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    elif cmd["op"] in ("wait", "poll"):
        deadline = time.monotonic() + cmd.get("timeout", 0)
        while True:
            done, status = os.waitpid(cmd["pid"], os.WNOHANG)
            if done or cmd["op"] == "poll":
                break
            if time.monotonic() > deadline:
                os.kill(cmd["pid"], signal.SIGKILL)  # a hang: report it as such
                done, status = os.waitpid(cmd["pid"], 0)
                print("hung", flush=True)
                break
            time.sleep(0.02)
        print(os.waitstatus_to_exitcode(status) if done else "running", flush=True)
"""


class Forker:
    """Training processes forked from one interpreter that imported torch and the package once (one thread)."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        assert self._ask(None) == "ready"

    def _ask(self, cmd: dict | None) -> str:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer == "hung":
            answer = self.proc.stdout.readline().strip()
            raise AssertionError(f"process {cmd and cmd.get('pid')} did not end in {cmd and cmd.get('timeout')} s")
        assert answer, "the forking interpreter died"
        return answer

    def start(self, code: str, log: Path, env: dict[str, str] | None = None) -> int:
        return int(self._ask({"op": "start", "code": code, "log": str(log), "env": env or {}}))

    def wait(self, pid: int, timeout: float = 120) -> int:
        return int(self._ask({"op": "wait", "pid": pid, "timeout": timeout}))

    def poll(self, pid: int) -> int | None:
        answer = self._ask({"op": "poll", "pid": pid})
        return None if answer == "running" else int(answer)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # its children were all waited for; its own exit would only tear down torch
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forker():
    f = Forker()
    yield f
    f.close()


def _newest_step(folder: Path) -> int:
    steps = [s for s, _ in step_checkpoints(folder)]
    return max(steps, default=0)


def _train(main: str, args: list[str]) -> str:
    return f"import sys\nfrom monai_diffusion.cli import {main}\nsys.exit({main}({args!r}))\n"


def _interrupt_until_done(forker: Forker, code: str, folder: Path, log: Path, schedule: list[str],
                          rng: random.Random) -> list[int]:
    """Start the same command again and again; interrupt each start once it has written 1-2 new step checkpoints,
    after a random extra delay, by the schedule's signal; finally let it finish. Returns the exit codes."""
    codes = []
    for how in [*schedule, "finish"]:
        target = _newest_step(folder) + rng.randint(1, 2)
        pid = forker.start(code, log)
        if how == "finish":
            codes.append(forker.wait(pid))
            break
        deadline, ended = time.monotonic() + 120, None
        while _newest_step(folder) < target and time.monotonic() < deadline:
            ended = forker.poll(pid)
            if ended is not None:
                break
            time.sleep(0.01)
        if ended is not None:  # it finished first (and was waited for)
            codes.append(ended)
            continue
        time.sleep(rng.uniform(0.0, 0.1))
        for sig in {"kill": [signal.SIGKILL], "term": [signal.SIGTERM],
                    "term twice": [signal.SIGTERM, signal.SIGTERM]}[how]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            time.sleep(0.002)
        codes.append(forker.wait(pid))
    return codes


def _assert_same_run(reference: Path, resumed: Path, stage: str) -> None:
    a, b = load_checkpoint(reference, stage), load_checkpoint(resumed, stage)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for module, weights in a["state_dict"].items():
        for key, value in weights.items():
            assert torch.equal(value, b["state_dict"][module][key]), f"{module}.{key}"
    # the logged epoch means (which resumed runs put together from partial sums) and validation agree too
    strip = [{k: v for k, v in h.items() if k != "train_seconds"} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "train_seconds"} for h in b["history"]]


def _check_codes(codes: list[int], schedule: list[str], log: Path) -> None:
    text = log.read_text()
    # 0: that start had finished the run before its signal came (possible on a fast machine, and harmless)
    allowed = {"kill": {-signal.SIGKILL, 0}, "term": {128 + signal.SIGTERM, 0},
               "term twice": {128 + signal.SIGTERM, -signal.SIGTERM, 0}}
    for how, code in zip(schedule, codes):
        assert code in allowed[how], (how, code, text[-3000:])
    assert sum(code != 0 for code in codes[:-1]) >= len(schedule) - 1, codes  # interrupted, again and again
    assert codes[-1] == 0, text[-3000:]
    if 128 + signal.SIGTERM in codes:
        assert "SIGTERM: stopped after optimizer step" in text and "resume_from=latest" in text


def _stage_args(root: Path, *extra: str) -> list[str]:
    """The tiny run on 16^3 phantoms (4 train, 1 val) with random flips, batch 1: autoencoder [4, 4] with factor 2,
    three epochs after one of warm-up, no perceptual loss; UNet [4, 4] without attention, 20 timesteps, three epochs
    with warm-up and EMA. Stage 2 is given its autoencoder checkpoint by the caller."""
    return cli_args(QUICKSTART, tiny_overrides(
        root,
        "data.synthetic={enabled: true, num_train: 4, num_val: 1, seed: 0}",
        "data.crop_mode=resize",
        "data.augmentation={enabled: true, random_flip_prob: 0.5}",
        "autoencoder.num_channels=[4, 4]",
        "autoencoder.downsample_factors=[2]",
        "autoencoder.training.n_epochs=3",
        "autoencoder.training.batch_size=1",
        "autoencoder.training.autoencoder_warm_up_n_epochs=1",
        "autoencoder.training.use_perceptual_loss=false",
        "diffusion.num_channels=[4, 4]",
        "diffusion.attention_levels=[false, false]",
        "diffusion.num_head_channels=4",
        "diffusion.scheduler.num_train_timesteps=20",
        "sampling.num_inference_steps=5",
        "diffusion.training.n_epochs=3",
        "diffusion.training.batch_size=1",
        "diffusion.training.lr_warmup_steps=3",
        "diffusion.training.ema_decay=0.9",
        "diffusion.training.generate_samples_interval=100",
        "diffusion.training.scale_factor_batches=2",
        *extra,
        leave=("diffusion.checkpoints.autoencoder_path", "sampling.output_dir"),
    ))


def _resumable(section: str) -> list[str]:
    """What a requeued job script passes every time: resume the newest checkpoint, or start when there is none."""
    return [f"{section}.checkpoints.every_n_steps=1", f"{section}.checkpoints.keep_last=2",
            f"{section}.checkpoints.resume_from=latest", f"{section}.checkpoints.start_fresh_if_none=true"]


def test_stage_one_and_two_survive_sigkill_and_sigterm_at_random_moments(forker, tmp_path):
    """Both stages, each started again with the same command after SIGKILLs and SIGTERMs at random moments, end
    with exactly the weights (and logged means) of an uninterrupted run."""
    rng = random.Random(15)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert forker.wait(forker.start(_train("train_autoencoder_main", _stage_args(ref)), tmp_path / "ref1.log")) == 0
    schedule = ["kill", "term", "kill", "term twice"]
    command = _train("train_autoencoder_main", _stage_args(cut, *_resumable("autoencoder")))
    codes = _interrupt_until_done(forker, command, cut / "ae", tmp_path / "cut1.log", schedule, rng)
    _check_codes(codes, schedule, tmp_path / "cut1.log")
    _assert_same_run(ref / "ae" / "latest_checkpoint.pt", cut / "ae" / "latest_checkpoint.pt", "autoencoder")
    assert len(step_checkpoints(cut / "ae")) <= 2  # keep_last
    assert not [p for p in (cut / "ae").iterdir() if p.name.startswith(".")]  # no half-written files left

    ae = f"diffusion.checkpoints.autoencoder_path={ref / 'ae' / 'best_model.pt'}"
    assert forker.wait(forker.start(_train("train_diffusion_main", _stage_args(ref, ae)), tmp_path / "ref2.log")) == 0
    schedule = ["term", "kill", "kill"]
    command = _train("train_diffusion_main", _stage_args(cut, ae, *_resumable("diffusion")))
    codes = _interrupt_until_done(forker, command, cut / "dm", tmp_path / "cut2.log", schedule, rng)
    _check_codes(codes, schedule, tmp_path / "cut2.log")
    _assert_same_run(ref / "dm" / "latest_checkpoint.pt", cut / "dm" / "latest_checkpoint.pt", "diffusion")
    # the latent scale factor was estimated once, by the first start, and kept by every resume
    assert (load_checkpoint(cut / "dm" / "latest_checkpoint.pt")["scale_factor"]
            == load_checkpoint(ref / "dm" / "latest_checkpoint.pt")["scale_factor"])
    assert (tmp_path / "cut2.log").read_text().count("latent scale factor") == 1


DDP_TOY = r"""
import os, signal, sys
from pathlib import Path
import torch, torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from monai_diffusion.engine import LoopConfig, run_loop
from monai_diffusion.errors import RunError
from monai_diffusion.runtime import setup_runtime, teardown_runtime


class Toy:
    name = "toy"

    def __init__(self, nan_at, term_at):
        torch.manual_seed(0)
        self.net = DistributedDataParallel(nn.Linear(3, 1))
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.SGD(self.net.parameters(), lr=0.1)}
        self.calls, self.nan_at, self.term_at = 0, nan_at, term_at

    def training_step(self, batch, epoch):
        self.calls += 1
        if self.calls == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        loss = (self.net(x + 0.1 * torch.randn_like(x)) - y).pow(2).mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"net": loss}, {"mse": loss.item()}

    def validation_step(self, batch): return {"val_loss": 0.0}
    def visualize(self, batch, quick=False): return {}
    def describe(self, batch): return []
    def checkpoint_extra(self): return {"model_args": {}}
    def architecture(self): return {}
    def load_extra(self, ckpt, path): pass


runtime = setup_runtime(False, 0, False)
only_rank_1 = lambda name: int(os.environ[name]) if runtime.rank == 1 and os.environ.get(name) else None
stage = Toy(only_rank_1("NAN_AT"), only_rank_1("TERM_AT"))
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g))
loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=True, seed=0))
out = Path(os.environ["OUT"])
cfg = LoopConfig(n_epochs=2, output_dir=out, log_dir=out / "logs", section="toy", every_n_steps=2,
                 resume_from=os.environ.get("RESUME") or None)
code = 0
try:
    state = run_loop(stage, loader, None, cfg, runtime)
    print(f"rank {runtime.rank} ended after step {state.global_step}, stopped by {state.stopped_by}", flush=True)
    code = state.exit_code
except RunError as exc:
    print(f"rank {runtime.rank} error: {exc}", flush=True)
    code = 2
finally:
    teardown_runtime(runtime)
sys.exit(code)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(forker: Forker, tmp_path: Path, name: str, **env: str) -> list[tuple[int, str]]:
    """Run DDP_TOY as a 2-process gloo group; each rank's exit code and output."""
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), **env}
    logs = [tmp_path / f"{name}-rank{r}.log" for r in range(2)]
    pids = [forker.start(DDP_TOY, logs[r], dict(common, RANK=str(r), LOCAL_RANK=str(r))) for r in range(2)]
    codes = [forker.wait(pid, timeout=60) for pid in pids]  # a rank left hanging fails here
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def _after(text: str, start: str) -> str:
    """The rest of the line after ``start`` (progress bars may precede it on its line)."""
    return next(line.split(start, 1)[1] for line in text.splitlines() if start in line)


def test_two_process_gloo_nonfinite_loss_on_one_rank_stops_both(forker, tmp_path):
    out = tmp_path / "nan"
    (code0, log0), (code1, log1) = _two_ranks(forker, tmp_path, "nan", NAN_AT="3", OUT=str(out))
    assert code0 == code1 == 2, log0 + log1
    message = _after(log0, "rank 0 error: ")
    assert message == _after(log1, "rank 1 error: ")  # the same words on both ranks
    assert "loss 'net' became nan on rank 1 at epoch 1, batch 3" in message
    assert f"the last good checkpoint is {out / 'step_checkpoint_00000002.pt'}" in message
    assert [s for s, _ in step_checkpoints(out)] == [2]


def test_two_process_gloo_sigterm_on_one_rank_stops_both_after_the_same_step(forker, tmp_path):
    out = tmp_path / "term"
    (code0, log0), (code1, log1) = _two_ranks(forker, tmp_path, "term", TERM_AT="5", OUT=str(out))
    assert code0 == code1 == 128 + signal.SIGTERM, log0 + log1
    assert "rank 0 ended after step 5, stopped by SIGTERM" in log0  # rank 0 got no signal, yet stopped with rank 1
    assert "rank 1 ended after step 5, stopped by SIGTERM" in log1
    assert "SIGTERM: stopped after optimizer step 5 (epoch 2, batch 1 of 4)" in log0
    ckpt = load_checkpoint(out / "step_checkpoint_00000005.pt")
    assert len(ckpt["position"]["ranks"]) == 2  # each rank's random states, for its own resume
    # both ranks resume the newest checkpoint and finish; the result equals an uninterrupted 2-process run
    (c0, l0), (c1, l1) = _two_ranks(forker, tmp_path, "resume", OUT=str(out), RESUME="latest")
    assert c0 == c1 == 0 and "rank 0 ended after step 8" in l0, l0 + l1
    (c0, l0), _ = _two_ranks(forker, tmp_path, "full", OUT=str(tmp_path / "full"))
    assert c0 == 0, l0
    a = load_checkpoint(tmp_path / "full" / "latest_checkpoint.pt")["state_dict"]["net"]
    b = load_checkpoint(out / "latest_checkpoint.pt")["state_dict"]["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)
