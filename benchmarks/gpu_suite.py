"""The GPU suite (issue 24): one command that runs and measures everything the project does on one CUDA device,
within a total time budget, writing its results as it goes.

Parts, in this order (cheap and decisive first):

1. **CUDA smoke**: ``--fast-dev-run`` of both stages of every shipped config at its own voxel size (batch 1, each
   with its own precision; the 8x config also in fp16 with loss scaling), one real one-step run of stage 1 (and of
   stage 2 for the 8x config) to give stage 2 (and part 5) a checkpoint; exit code, seconds per step and peak
   ``torch.cuda.max_memory_allocated`` as ``fast_dev_run`` prints them. Then ``plan --budget-gb 24`` on the 8x
   config beside the measured peaks, and the size of the CUDA context (what ``plan``'s context allowance covers).
2. **Memory and time per factor** at 256x256x64, batch 1: one autoencoder training step (forward, L1 + KL,
   backward, Adam) of the fork at 4x/8x/16x with the seed's 8x channels (32, 64, 64), MONAI core's
   ``AutoencoderKL`` 4x, and MAISI's ``AutoencoderKlMaisi`` as MAISI ships it, in fp32 and bf16; peak memory and
   step time as ratios to core 4x fp32, beside seed 002's A100 table.
3. **512^3 decode** of an 8x latent in exact tiles (peak, time) beside MAISI's published 22.8 GB / ~30 s on an
   A100, MAISI's own decoder with its splitting on the same GPU, and the tiled decode's exactness with TF32 off.
4. **Quality at a realistic size**: the built-in ``brain`` dataset at 96x112x96, 8x; stage 1, then stage 2 with
   rectified flow, each for as many steps as its time share allows (stopped with SIGTERM, which the app handles
   by finishing the step and saving); ``evaluate`` with 32 samples in 30 steps, and its picture grid.
5. **Sampling time** per volume at 256x256x64 (8x latent) from part 1's stage-2 checkpoint: DDPM-1000, DDIM-50,
   rectified flow 30.
6. **Side by side with MAISI**: ``benchmarks/vs_maisi.py`` within its share (about 2 of the 9 minutes): one training
   step at 128^3 of MAISI's VAE and of the fork (8x, 8x with MAISI's latent size, the 8x recipe), a short
   reconstruction race on the brain data, and the 512^3 decode of one latent by MAISI's sliding window and by exact
   tiles, with each one's deviation from the whole decode; its own files (``vs_maisi_cuda.{json,md,png}``) are
   written beside the suite's.

Every measurement runs in a subprocess with a timeout taken from its part's share of what is left of the budget
(``--budget-min``, default 9); a part that fails or runs out of time records the error and the suite moves on.
Results are rewritten after every measurement, so a kill at any moment leaves what was measured so far:
``benchmarks/results/gpu_<gpu name>.{json,md}`` (plus the picture grid), and with ``--out DIR`` the same files,
the picture and the log in ``DIR`` (plus part 6's three ``vs_maisi_cuda`` files). ``--dry-run`` runs every part's
code on the CPU at tiny sizes (one or two configurations per part) in about a minute and writes only to ``--out``.

    python benchmarks/gpu_suite.py --out /tmp/gpu_out               # on the GPU machine (see benchmarks/README.md)
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu_dry     # anywhere: the same code paths on the CPU
    python benchmarks/gpu_suite.py --parts 2 3 --budget-min 4       # some parts only

TF32: cuDNN uses TF32 for fp32 convolutions by default. The suite leaves that default for the speed measurements
(it records the flags) and turns TF32 off for the exactness check of part 3, whose bound is fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from vs_maisi import MAISI_ARGS

REPO = _common.REPO_ROOT
CONFIGS = REPO / "monai_diffusion" / "config"

# ------------------------------------------------------------------------------------------------------------------
# The app's entry points the suite drives: its command lines, and the few Python functions where the CLI has no verb.
# Everything the suite uses of monai_diffusion is named here, so that it can be re-pointed when modules move.
CLI = {
    "stage1": REPO / "monai_diffusion" / "3d_ldm" / "train_autoencoder.py",
    "stage2": REPO / "monai_diffusion" / "3d_ldm" / "train_diffusion.py",
    "evaluate": REPO / "monai_diffusion" / "3d_ldm" / "evaluate.py",
}
PLAN_MODULE = "monai_diffusion.plan"  # python -m monai_diffusion.plan = monai-diffusion-plan


def app() -> Any:
    """The app's Python functions, imported in the worker processes only."""
    from types import SimpleNamespace

    from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main
    from monai_diffusion.generate import Sampler
    from monai_diffusion.settings import load_settings
    from monai_diffusion.synthetic import make_synthetic_dataset

    return SimpleNamespace(train_autoencoder_main=train_autoencoder_main, train_diffusion_main=train_diffusion_main,
                           Sampler=Sampler, load_settings=load_settings, make_synthetic_dataset=make_synthetic_dataset)
# ------------------------------------------------------------------------------------------------------------------

TITLES = {
    1: "CUDA smoke: every shipped config, both stages",
    2: "Memory and time per factor at 256x256x64",
    3: "512^3 decode from an 8x latent",
    4: "Quality at a realistic size (brain 96x112x96, 8x)",
    5: "Sampling time per volume at 256x256x64",
    6: "Side by side with MAISI (vs_maisi.py at GPU size)",
}
# share of the time left that each part gets when it starts (relative to the parts still to come)
SHARES = {1: 0.25, 2: 0.15, 3: 0.12, 4: 0.35, 5: 0.13, 6: 0.28}  # 6: about 2 of the 9 minutes
MIN_ITEM_S = 5.0  # an item with less time than this left in its part is skipped, not started
SEED_A100 = {"4x": (8.2, 1.0), "8x": (3.1, 1.4), "16x": (1.5, 2.1)}  # seed 002: GB with AMP, speed vs 4x
MAISI_512 = {"gb": 22.8, "seconds": 30.0}  # MAISI's published 512^3 decode on an A100
# MAISI's VAE as it ships (MAISI_ARGS) lives in vs_maisi.py, the side-by-side benchmark that part 6 runs.
# norm_float16 (GroupNorm output in fp16) only works inside fp16 autocast, as MAISI infers on a GPU; the training-step
# rows (fp32, bf16) and the CPU dry run use the same network with it off. MAISI's split convolutions are very slow on
# a CPU (one training step at 16 x 64 x 16 took two minutes on the shared 2-core machine), so the dry run builds the
# same class with a few channels, one residual block per level and two splits.
DRY_MAISI_ARGS = dict(MAISI_ARGS, num_channels=(8, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=4, num_splits=2)


def maisi(dry: bool, norm_float16: bool) -> Any:
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    return AutoencoderKlMaisi(**{**(DRY_MAISI_ARGS if dry else MAISI_ARGS), "norm_float16": norm_float16})

# part 1: (label, config file, data size or None = the config's own, stages); "ckpt" steps train one real step
SMOKE = [
    ("ldm_config", "ldm_config.yaml", ["s1", "s1ckpt", "s2"]),
    ("8x", "examples/ldm_config_8x_downsample.yaml", ["s1", "s1fp16", "s1ckpt", "s2", "s2fp16", "s2ckpt", "s2rflow"]),
    ("16x", "examples/ldm_config_16x_downsample.yaml", ["s1", "s1ckpt", "s2"]),
    ("2d_512", "examples/ldm_config_2d_512.yaml", ["s1", "s1ckpt", "s2"]),
    # quickstart, and a projection-conditioned stage 2 on quickstart's autoencoder (s2proj)
    ("quickstart", "examples/quickstart.yaml", ["s1", "s1ckpt", "s2", "s2proj"]),
    ("quickstart_vq", "examples/quickstart_vq.yaml", ["s1", "s1ckpt", "s2"]),
    ("pixel_2d", "examples/pixel_2d_phantom.yaml", ["s2"]),
]
DRY_SMOKE = ["quickstart"]


# ============================================================================================ running subprocesses
def child_env() -> dict[str, str]:
    """The environment of every subprocess: the project (and the suite's folder) on PYTHONPATH, before what was
    there (e.g. the folder the wheels were installed into)."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "GenerativeModels"), str(REPO / "benchmarks")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_process(cmd: list[str], timeout: float, log: Path, stop_after: float | None = None,
                stop_when: Any = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group and kill the group after ``timeout`` seconds. With ``stop_after``, send
    SIGTERM to the process once that many seconds have passed and ``stop_when()`` (if given) is true, e.g. a
    checkpoint exists: the app then finishes its optimizer step, saves and exits. Appends the command and its output
    to ``log``."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=child_env(), start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    timed_out = stopped = False
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if now > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if stop_after is not None and not stopped and now >= stop_after and (stop_when is None or stop_when()):
            stopped = True
            proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=10)
    out = "".join(chunks)
    seconds = time.perf_counter() - t0
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n# exit {proc.returncode}, {seconds:.1f} s"
                f"{', killed at its timeout' if timed_out else ''}{', sent SIGTERM' if stopped else ''}\n")
        f.write(out[-40000:] + "\n")
    return {"rc": proc.returncode, "seconds": round(seconds, 2), "timed_out": timed_out, "sigterm": stopped,
            "output": out}


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def worker_cmd(name: str, payload: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, json.dumps(payload)]


def worker_result(run: dict[str, Any]) -> dict[str, Any]:
    """The JSON a worker printed on its ``SUITE-RESULT`` line, or an error with the output's tail; ``rows``: every
    ``SUITE-ROW`` line it printed, also when it was killed before the end."""
    rows = [json.loads(ln[len("SUITE-ROW "):]) for ln in run["output"].splitlines() if ln.startswith("SUITE-ROW ")]
    for line in reversed(run["output"].splitlines()):
        if line.startswith("SUITE-RESULT "):
            return {**json.loads(line[len("SUITE-RESULT "):]), "rows": rows}
    why = "killed at its time share" if run["timed_out"] else f"exit code {run['rc']}"
    return {"error": f"{why}: {tail(run['output'])}", "rows": rows}


def emit(r: dict[str, Any]) -> None:
    """A worker's result row, printed at once so that a kill keeps it."""
    print("SUITE-ROW " + json.dumps(r), flush=True)


def cli_args(config: Path, sets: list[str]) -> list[str]:
    out = ["--config", str(config)]
    for s in sets:
        out += ["--set", s]
    return out


# ================================================================================================ the suite itself
class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.start = time.perf_counter()
        self.end = self.start + 60 * args.budget_min
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_suite_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.machine = _common.machine_info(self.device)
        name = "dryrun_cpu" if self.dry else re.sub(r"[^A-Za-z0-9]+", "_", self.machine.get("gpu", "cuda")).strip("_")
        self.stem = f"gpu_{name}"
        self.out = Path(args.out) if args.out else None
        self.targets = [] if self.dry else [_common.RESULTS_DIR]
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            self.targets.append(self.out)
        self.log = (self.out or self.work) / f"{self.stem}.log"
        self.log.write_text(f"# {' '.join(sys.argv)}\n# {_common.machine_line(self.machine)}\n", encoding="utf-8")
        self.report: dict[str, Any] = {
            "suite": {"command": " ".join(["python benchmarks/gpu_suite.py", *sys.argv[1:]]),
                      "budget_min": args.budget_min, "dry_run": self.dry, "device": self.device,
                      "work_dir": str(self.work), "parts_asked": args.parts},
            "machine": self.machine,
            "parts": {},
        }
        self.part = 0
        self.part_end = self.end
        self.pictures: list[Path] = []
        self.background = self.background_run = self.background_folder = None
        if 4 in args.parts and not self.dry:
            self.start_quality_data()

    def start_quality_data(self) -> None:
        """Write part 4's 36 brain volumes (about 2 s each on one core) in a thread from the start, while parts 1-3
        keep the GPU busy."""
        import threading

        folder = self.work / "data" / "brain_96x112x96"
        payload = {"folder": str(folder), "kind": "brain", "size": [96, 112, 96], "num_train": 32, "num_val": 4}

        def work() -> None:
            self.background_run = run_process(worker_cmd("data", payload), 60 * self.args.budget_min, self.log)

        self.background_folder = str(folder)
        self.background = threading.Thread(target=work, daemon=True)
        self.background.start()

    # ---------------------------------------------------------------------------------------------- bookkeeping
    def left(self) -> float:
        return self.part_end - time.perf_counter()

    def begin_part(self, part: int) -> dict[str, Any]:
        self.part = part
        now = time.perf_counter()
        todo = [p for p in self.args.parts if p >= part]
        share = SHARES[part] / sum(SHARES[p] for p in todo)
        self.part_end = now + max(0.0, self.end - now) * share
        entry = {"title": TITLES[part], "status": "running", "time_share_s": round(self.part_end - now, 1),
                 "items": [], "summary": {}}
        self.report["parts"][str(part)] = entry
        print(f"== part {part}: {TITLES[part]} ({entry['time_share_s']:.0f} s)", flush=True)
        self.save()
        return entry

    def end_part(self, entry: dict[str, Any], t0: float) -> None:
        items = entry["items"]
        bad = [i for i in items if i.get("error")]
        entry["status"] = "ok" if items and not bad else ("error" if len(bad) == len(items) else "partial")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        self.save()
        print(f"   part {self.part}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)

    def add(self, entry: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        entry["items"].append(item)
        state = f"ERROR {item['error']}" if item.get("error") else "ok"
        print(f"   {item.get('name')}: {state[:300]}", flush=True)
        self.save()
        return item

    def timeout(self, cap: float | None = None) -> float | None:
        """Seconds the next subprocess may take (None: no time left in this part)."""
        left = self.left()
        if left < MIN_ITEM_S:
            return None
        return min(left, cap) if cap else left

    def skipped(self, name: str) -> dict[str, Any]:
        return {"name": name, "error": "skipped: the part's time share was spent"}

    def save(self) -> None:
        self.report["suite"]["seconds"] = round(time.perf_counter() - self.start, 1)
        md = render(self.report)
        for folder in self.targets:
            _common.write_results(folder / self.stem, self.report, md)

    # ------------------------------------------------------------------------------------------------- helpers
    def base_sets(self, tag: str, data: Path) -> list[str]:
        """Overrides that point a config at the suite's data and folders, on this device."""
        run = self.work / tag
        return [
            "data.synthetic={enabled: false}", "data.datalist=null", f"data.train_data_dir={data / 'train'}",
            f"data.val_data_dir={data / 'val'}", "data.num_workers=0", "data.cache_dir=null",
            f"autoencoder.checkpoints.output_dir={run / 'ae'}", "autoencoder.checkpoints.resume_from=null",
            f"diffusion.checkpoints.output_dir={run / 'dm'}", "diffusion.checkpoints.resume_from=null",
            f"diffusion.checkpoints.autoencoder_path={run / 'ae' / 'best_model.pt'}",
            f"sampling.output_dir={run / 'samples'}",
            f"device.use_cuda={'false' if self.dry else 'true'}",
        ]

    def write_data(self, kind: str, size: list[int], num_train: int, num_val: int, cap: float | None = None
                   ) -> tuple[Path | None, dict[str, Any]]:
        folder = self.work / "data" / f"{kind}_{'x'.join(map(str, size))}_{num_train}_{num_val}"
        t = self.timeout(cap)
        if t is None:
            return None, self.skipped(f"data {kind}")
        run = run_process(worker_cmd("data", {"folder": str(folder), "kind": kind, "size": size,
                                               "num_train": num_train, "num_val": num_val}), t, self.log)
        res = worker_result(run)
        return (folder if "error" not in res else None), {"name": f"data {kind} {size}", **res,
                                                            "seconds": run["seconds"]}


# ============================================================================================== part 1: CUDA smoke
SMOKE_STEPS = {
    # step: (stage, fast-dev-run?, extra overrides)
    "s1": ("stage1", True, []),
    "s1fp16": ("stage1", True, ["device.mixed_precision=fp16"]),
    "s1ckpt": ("stage1", False, ["autoencoder.training.n_epochs=1", "autoencoder.training.val_interval=1",
                                 "data.max_data_size_for_train=1", "autoencoder.training.gradient_accumulation_steps=1"]),
    "s2": ("stage2", True, []),
    "s2fp16": ("stage2", True, ["device.mixed_precision=fp16"]),
    "s2ckpt": ("stage2", False, ["diffusion.training.n_epochs=1", "diffusion.training.val_interval=1",
                                 "data.max_data_size_for_train=1", "diffusion.training.gradient_accumulation_steps=1",
                                 "diffusion.training.num_samples_to_generate=0"]),
    "s2rflow": ("stage2", False, ["diffusion.training.n_epochs=1", "diffusion.training.val_interval=1",
                                  "data.max_data_size_for_train=1", "diffusion.training.gradient_accumulation_steps=1",
                                  "diffusion.training.num_samples_to_generate=0", "diffusion.scheduler.type=rflow",
                                  "diffusion.checkpoints.output_dir={run}/dm_rflow"]),
    "s2proj": ("stage2", True, ["diffusion.condition_channels=1"]),
}
FDR_STEP = re.compile(r"fast_dev_run: (\d+) training step\(s\), ([\d.]+) s/step")
FDR_PEAK = re.compile(r"fast_dev_run: peak memory of the last training step (\d+) MiB")


def config_size(config: Path) -> list[int]:
    import yaml

    return list(yaml.safe_load(config.read_text())["data"]["voxel_size"])


def part1(s: Suite) -> None:
    entry = s.begin_part(1)
    t0 = time.perf_counter()
    labels = DRY_SMOKE if s.dry else [c[0] for c in SMOKE]
    peaks: dict[str, Any] = {}
    for label, rel, steps in SMOKE:
        if label not in labels:
            continue
        config = CONFIGS / rel
        size = [16, 16, 16] if s.dry else config_size(config)
        data = s.work / "data" / f"phantom_{'x'.join(map(str, size))}"
        run_dir = s.work / f"smoke_{label}"
        sets = s.base_sets(f"smoke_{label}", data) + [
            "autoencoder.training.batch_size=1", "diffusion.training.batch_size=1",
            "autoencoder.logging.log_dir=null", "diffusion.logging.log_dir=null"]
        if s.dry:
            sets += DRY_NETWORK
            steps = [*steps, "s2ckpt", "s2rflow"]  # the dry run's part 5 samples from these (GPU run: the 8x's)
        plan = [[name, stage, fdr, [x.replace("{run}", str(run_dir)) for x in extra]]
                for name, (stage, fdr, extra) in ((n, SMOKE_STEPS[n]) for n in steps)]
        # at most twice an even split of what is left, so that one config that hangs cannot take all the others'
        remaining = len(labels) - labels.index(label)
        t = s.timeout(None if s.dry else max(60.0, 2 * s.left() / remaining))
        if t is None:
            s.add(entry, s.skipped(label))
            continue
        payload = {"config": str(config), "sets": sets, "steps": plan, "context": label == "quickstart",
                   "device": s.device,
                   "data": {"folder": str(data), "kind": "phantom", "size": size, "num_train": 2, "num_val": 1}}
        run = run_process(worker_cmd("smoke", payload), t, s.log)
        res = worker_result(run)
        for name, stage, fdr, _ in plan:
            seg = segment(run["output"], name)
            item: dict[str, Any] = {"name": f"{label} {name}", "config": rel, "size": size, "stage": stage,
                                    "fast_dev_run": fdr}
            if seg is None:
                item["error"] = ("killed at its time share" if run["timed_out"] else
                                 f"not reached (worker exit {run['rc']}: {tail(run['output'], 3)})")
            else:
                text, rc = seg
                item["exit_code"] = rc
                m, p = FDR_STEP.search(text), FDR_PEAK.search(text)
                if m:
                    item["steps"], item["s_per_step"] = int(m.group(1)), float(m.group(2))
                if p:
                    item["peak_mib"] = float(p.group(1))
                if rc != 0:
                    item["error"] = f"exit code {rc}: {tail(text, 4)}"
                elif fdr and (not m or not p):
                    item["error"] = "fast_dev_run printed no step time or peak: " + tail(text, 3)
            s.add(entry, item)
            if label == "8x" and name in ("s1", "s2") and "peak_mib" in item:
                peaks["stage1" if name == "s1" else "stage2"] = item["peak_mib"]
        if label == "8x" or (s.dry and label == "quickstart"):
            entry["summary"]["stage2_checkpoints"] = {"ddpm": str(run_dir / "dm" / "best_model.pt"),
                                                      "rflow": str(run_dir / "dm_rflow" / "best_model.pt")}
            entry["summary"]["stage2_config"] = str(config)
            entry["summary"]["stage2_sets"] = sets
        if label == "quickstart":
            ctx = next((r for r in res["rows"] if r.get("name") == "CUDA context"), None)
            s.add(entry, ctx or {"name": "CUDA context", "error": res.get("error", "not measured")})

    # plan --budget-gb 24 on the 8x config (dry run: the quickstart at 16^3), beside the fast_dev_run peaks
    label = "quickstart" if s.dry else "8x"
    config = CONFIGS / ("examples/quickstart.yaml" if s.dry else "examples/ldm_config_8x_downsample.yaml")
    if s.dry:
        peaks = {k: next((i["peak_mib"] for i in entry["items"] if i["name"] == f"quickstart {n}" and "peak_mib" in i),
                         None) for k, n in (("stage1", "s1"), ("stage2", "s2"))}
    t = s.timeout()
    if t is None:
        s.add(entry, s.skipped("plan"))
    else:
        js = s.work / "plan.json"
        sets = ["data.voxel_size=[16, 16, 16]", *DRY_NETWORK] if s.dry else []
        # the dry run plans without measuring (three more processes): the report and its reading still run
        cmd = [sys.executable, "-m", PLAN_MODULE, *cli_args(config, sets), "--budget-gb", "24", "--device",
               s.device, "--timeout", str(int(t)), "--json", str(js), *(["--no-measure"] if s.dry else [])]
        run = run_process(cmd, t, s.log)
        item = {"name": f"plan --budget-gb 24 ({label})"}
        if run["rc"] != 0 or not js.is_file():
            item["error"] = f"exit code {run['rc']}: {tail(run['output'])}"
        else:
            p = json.loads(js.read_text())
            for stage in ("autoencoder", "diffusion"):
                m = p[stage].get("measurement") or {}
                v = (p.get("verdicts") or {}).get(stage) or {}
                measured = peaks.get("stage1" if stage == "autoencoder" else "stage2")
                item[stage] = {"plan_peak_mib": m.get("peak_mib"), "plan_reserved_mib": m.get("reserved_mib"),
                               "plan_need_mib": v.get("need_mib"), "fits_24gb": v.get("fits"),
                               "fast_dev_run_peak_mib": measured,
                               "plan_over_measured": (m["peak_mib"] / measured) if m.get("peak_mib") and measured
                               else None, "error": m.get("error")}
            if not s.dry and not all(item[st]["plan_peak_mib"] for st in ("autoencoder", "diffusion")):
                item["error"] = "plan measured no peak: " + "; ".join(
                    str(item[st]["error"]) for st in ("autoencoder", "diffusion"))
        s.add(entry, item)
    s.end_part(entry, t0)


def segment(output: str, name: str) -> tuple[str, int] | None:
    """The output of smoke step ``name`` and its exit code, from the worker's markers."""
    m = re.search(rf"^@@ begin {re.escape(name)}$(.*?)^@@ end {re.escape(name)} (-?\d+)$", output, re.S | re.M)
    return (m.group(1), int(m.group(2))) if m else None


# tiny networks for the dry run (every shipped config's channels are too large for 16^3 on a shared 2-core CPU)
DRY_NETWORK = [
    "autoencoder.num_channels=[4, 8, 8]", "autoencoder.norm_num_groups=4", "autoencoder.latent_channels=2",
    "autoencoder.training.adv_weight=0.01", "autoencoder.training.autoencoder_warm_up_n_epochs=0",
    "autoencoder.training.discriminator={num_layers_d: 1, num_channels: 4}",
    "diffusion.in_channels=2", "diffusion.out_channels=2", "diffusion.num_channels=[8, 8]",
    "diffusion.attention_levels=[false, true]", "diffusion.num_head_channels=[0, 8]", "diffusion.norm_num_groups=4",
    "diffusion.scheduler.num_train_timesteps=20", "sampling.num_inference_steps=2",
]


# =================================================================================== part 2: memory and time per factor
PART2_MODELS = ["core-4x", "4x", "8x", "16x-8-2", "maisi"]
PART2_LABELS = {"core-4x": "MONAI core 4x", "4x": "fork 4x", "8x": "fork 8x [4, 2]", "16x-8-2": "fork 16x [8, 2]",
                "maisi": "MAISI AutoencoderKlMaisi 4x (as shipped)"}


def part2(s: Suite) -> None:
    entry = s.begin_part(2)
    t0 = time.perf_counter()
    size = [16, 16, 16] if s.dry else [256, 256, 64]
    # dry run: three of the models in one process; GPU: one process per model (a fresh allocator each)
    groups = [["core-4x", "8x", "maisi"]] if s.dry else [[m] for m in PART2_MODELS]
    for models in groups:
        t = s.timeout()
        payload = {"models": models, "precisions": ["fp32", "bf16"], "size": size, "device": s.device, "dry": s.dry,
                   "maisi_size": DRY_MAISI if s.dry else size,
                   "steps": 1 if s.dry else 3, "warmup": 0 if s.dry else 1}
        res = worker_result(run_process(worker_cmd("step", payload), t, s.log)) if t else {"rows": []}
        done = {(r["model"], r["precision"]) for r in res["rows"]}
        for r in res["rows"]:
            s.add(entry, {"name": f"{r['model']} {r['precision']}", **r})
        for m in models:
            for prec in payload["precisions"]:
                if (m, prec) not in done:
                    s.add(entry, {"name": f"{m} {prec}", "model": m, "precision": prec,
                                  "error": res.get("error", "skipped: the part's time share was spent")})
    base = next((i for i in entry["items"] if i["name"] == "core-4x fp32" and not i.get("error")), None)
    for i in entry["items"]:
        if base and not i.get("error"):
            i["memory_ratio"] = i["peak_mib"] / base["peak_mib"]
            i["time_ratio"] = i["step_s"] / base["step_s"]
    entry["summary"] = {"size": size, "baseline": "core-4x fp32", "seed_a100": SEED_A100, "attention": "SDPA",
                        "tf32": {"cudnn": "default (on)", "matmul": "default (off)"}}
    s.end_part(entry, t0)


# MAISI splits its convolutions into num_splits pieces along dim_split (the second spatial axis), each padded by
# one voxel: at 16^3 its 4x level (4 voxels) cannot be split four ways, so its dry-run size is longer on that axis
DRY_MAISI = [16, 64, 16]


# ======================================================================================== part 3: 512^3 decode
def part3(s: Suite) -> None:
    entry = s.begin_part(3)
    t0 = time.perf_counter()
    size, tile, check = (16, 8, 16) if s.dry else (512, 128, 192)
    jobs = [["ours", "maisi"]] if s.dry else [["ours"], ["maisi"]]  # dry run: one process
    for which in jobs:
        t = s.timeout()
        if t is None:
            s.add(entry, s.skipped(" and ".join(which)))
            continue
        payload = {"which": which, "size": size, "tile": tile, "check_size": check, "device": s.device, "dry": s.dry,
                   "maisi_size": DRY_MAISI if s.dry else [size] * 3}
        res = worker_result(run_process(worker_cmd("decode", payload), t, s.log))
        for r in res["rows"]:
            s.add(entry, r)
        if "error" in res:
            s.add(entry, {"name": " and ".join(which), "error": res["error"]})
    entry["summary"] = {"size": size, "maisi_published_a100": MAISI_512}
    s.end_part(entry, t0)


# ======================================================================================== part 4: quality
def part4(s: Suite) -> None:
    entry = s.begin_part(4)
    t0 = time.perf_counter()
    kind = "brain"
    if s.dry:
        import importlib.util

        if importlib.util.find_spec("nilearn") is None:
            kind = "phantom"  # the dry run must run where nilearn is not installed (CI); the GPU run needs it
    size = [16, 16, 16] if s.dry else [96, 112, 96]
    num_train, num_val = (8, 2) if s.dry else (32, 4)
    if s.background is not None:  # started with the suite (GPU run): wait for it within this part's share
        s.background.join(timeout=max(1.0, s.left() - 30))
        run = s.background_run
        res = worker_result(run) if run else {"error": "still writing at the end of its wait"}
        data = Path(s.background_folder) if run and "error" not in res else None
        info = {**res, "seconds": run["seconds"] if run else None, "written_in_background": True}
    else:
        data, info = s.write_data(kind, size, num_train, num_val, cap=0.25 * s.left())
    info.pop("rows", None)
    s.add(entry, {**info, "name": f"data {kind} {size} ({num_train} + {num_val})"})
    config = CONFIGS / "examples" / "ldm_config_8x_downsample.yaml"
    sets = s.base_sets("quality", data or s.work / "missing") + [
        f"data.voxel_size={size}", "autoencoder.training.n_epochs=100000", "autoencoder.training.val_interval=1",
        "autoencoder.training.batch_size=2", "autoencoder.training.gradient_accumulation_steps=1",
        "autoencoder.training.save_interval=1",
        "diffusion.scheduler.type=rflow", "diffusion.training.n_epochs=100000", "diffusion.training.val_interval=1",
        "diffusion.training.save_interval=1", "diffusion.training.batch_size=4",
        "diffusion.training.num_samples_to_generate=0", "diffusion.training.cache_latents=true",
        "sampling.scheduler=rflow", "sampling.num_inference_steps=30",
        # the 12 x 14 x 12 latent of 96 x 112 x 96 at 8x halves once (14 = 2 x 7): a two-level UNet
        "diffusion.num_channels=[64, 128]", "diffusion.attention_levels=[false, true]",
        "diffusion.num_head_channels=[0, 32]",
    ]
    if s.dry:
        # fp32: this tiny UNet (8 channels, a 2^3 latent) trained with rectified flow under CPU bf16 autocast turns
        # NaN after 2-6 epochs (fp32 ran 10 without), and on a fast machine the SIGTERM below lands after epoch 2
        sets += [*DRY_NETWORK, "sampling.num_inference_steps=2", "device.mixed_precision=false"]
    quality = s.work / "quality"
    records: dict[str, Any] = {}
    for stage, share in (("stage1", 0.45), ("stage2", 0.75)):
        t = s.timeout()
        if data is None or t is None:
            s.add(entry, s.skipped(stage) if data is not None else {"name": stage, "error": "no data"})
            continue
        reserve = 0.45 * t if stage == "stage2" else 0.6 * t  # left for what follows (stage 2, evaluate)
        folder = quality / ("ae" if stage == "stage1" else "dm")
        # SIGTERM when the share is spent and a validated epoch has been saved (dry run: right after the first)
        run = run_process([sys.executable, str(CLI[stage]), *cli_args(config, sets)], t, s.log,
                          stop_after=0.0 if s.dry else max(10.0, t - reserve - 60),
                          stop_when=lambda f=folder: (f / "best_model.pt").is_file())
        item = {"name": f"{stage} ({'until SIGTERM' if run['sigterm'] else 'to the end'})", "rc": run["rc"],
                "seconds": run["seconds"], "stopped_by_sigterm": run["sigterm"]}
        hist = history(folder / "latest_checkpoint.pt")
        item.update(hist)
        if not (folder / "best_model.pt").is_file():
            item["error"] = f"no best_model.pt (exit {run['rc']}): {tail(run['output'])}"
        elif run["rc"] not in (0, 128 + signal.SIGTERM) or run["timed_out"]:
            item["error"] = f"exit code {run['rc']}{' (killed)' if run['timed_out'] else ''}: {tail(run['output'])}"
        records[stage] = s.add(entry, item)
    t = s.timeout()
    report = s.work / "quality_evaluation.json"
    if t is None or not (quality / "dm" / "best_model.pt").is_file():
        s.add(entry, s.skipped("evaluate") if t is None else {"name": "evaluate", "error": "no stage-2 checkpoint"})
    else:
        samples = 8 if s.dry else 32  # the C2ST needs at least 8 per set
        extra = ["--c2st-epochs", "2"] if s.dry else []
        run = run_process([sys.executable, str(CLI["evaluate"]), *cli_args(config, sets), "--num-samples",
                           str(samples), "--out", str(report), "--overwrite", *extra], t, s.log)
        item = {"name": f"evaluate ({samples} samples, {'2' if s.dry else '30'} rflow steps)", "rc": run["rc"],
                "seconds": run["seconds"]}
        if run["rc"] != 0 or not report.is_file():
            item["error"] = f"exit code {run['rc']}: {tail(run['output'])}"
        else:
            rep = json.loads(report.read_text())
            item["evaluation"] = {k: rep.get(k) for k in ("stage1_validation", "samples_vs_real", "samples_vs_recon",
                                                          "recon_vs_real", "pipeline")}
            grid = report.with_suffix(".png")
            if grid.is_file():
                s.pictures.append(grid)
                for folder in s.targets:
                    dest = folder / f"{s.stem}_quality.png"
                    dest.write_bytes(grid.read_bytes())
                item["picture"] = f"{s.stem}_quality.png"
            else:
                item["error"] = "evaluate wrote no picture grid"
        s.add(entry, item)
    entry["summary"] = {"dataset": kind, "size": size, "num_train": num_train, "factor": "8x [4, 2]",
                        "cpu_table": "benchmarks/results/quality_cpu.md (brain 32x48x32, 240 + 1000 steps)"}
    s.end_part(entry, t0)


def history(ckpt: Path) -> dict[str, Any]:
    """Steps, epochs and the last validation figures of a run, from its latest checkpoint (a worker would import the
    app; this reads the file with torch alone, weights_only)."""
    if not ckpt.is_file():
        return {}
    import torch

    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    last = (c.get("history") or [{}])[-1]
    return {"global_step": c.get("global_step"), "epochs": len(c.get("history") or []),
            "last_epoch": {k: v for k, v in last.items() if isinstance(v, (int, float))}}


# ======================================================================================== part 5: sampling time
def part5(s: Suite) -> None:
    entry = s.begin_part(5)
    t0 = time.perf_counter()
    smoke = s.report["parts"].get("1", {}).get("summary", {})
    ckpts = smoke.get("stage2_checkpoints") or {}
    t = s.timeout()
    if not ckpts or not all(Path(c).is_file() for c in ckpts.values()):
        s.add(entry, {"name": "sampling", "error": "no stage-2 checkpoints from part 1 (8x s2ckpt and s2rflow)"})
    elif t is None:
        s.add(entry, s.skipped("sampling"))
    else:
        # DDPM runs every training timestep (1000 in the 8x config; 20 in the dry run's tiny scheduler)
        samplers = [["ddpm", 20], ["ddim", 2], ["rflow", 2]] if s.dry else [["ddpm", 1000], ["ddim", 50], ["rflow", 30]]
        payload = {"config": smoke["stage2_config"], "sets": smoke["stage2_sets"], "checkpoints": ckpts,
                   "samplers": samplers, "repeats": 1 if s.dry else 2, "warmup": not s.dry}
        res = worker_result(run_process(worker_cmd("sample", payload), t, s.log))
        for r in res["rows"]:
            s.add(entry, r)
        if "error" in res or len(res["rows"]) < len(samplers):
            s.add(entry, {"name": "sampling", "error": res.get("error", "not every sampler was measured")})
    entry["summary"] = {"latent": "32 x 32 x 8 (8x of 256 x 256 x 64)" if not s.dry else "tiny (dry run)"}
    s.end_part(entry, t0)


# ======================================================================================== part 6: vs MAISI
VS_MAISI_MODELS = ["maisi", "8x", "8x-lat32", "recipe"]  # part 6's models in vs_maisi's parts 1 and 2


def part6(s: Suite) -> None:
    """``vs_maisi.py`` in a subprocess within this part's share: parts 1 and 3 at GPU size (training steps at 128^3,
    the 512^3 decode), part 2 short; its rows become this part's items, its files go beside the suite's."""
    entry = s.begin_part(6)
    t0 = time.perf_counter()
    t = s.timeout()
    folder = s.work / "vs_maisi"
    stem = folder / ("vs_maisi_dryrun_cpu" if s.dry else "vs_maisi_cuda")
    if t is None:
        s.add(entry, s.skipped("vs_maisi"))
        s.end_part(entry, t0)
        return
    cmd = [sys.executable, str(REPO / "benchmarks" / "vs_maisi.py"), "--out", str(stem), "--work", str(folder)]
    if s.dry:
        cmd += ["--dry-run"]
    else:
        # vs_maisi kills each measurement at its share of its own budget; 20 s are left for its last writes
        cmd += ["--device", "cuda", "--budget-min", f"{max(0.5, (t - 20) / 60):.2f}", "--models", *VS_MAISI_MODELS,
                "--decode-sizes", "512", "--budget-s", "3"]
    run = run_process(cmd, t, s.log)
    js = stem.with_suffix(".json")
    if not js.is_file():
        s.add(entry, {"name": "vs_maisi", "error": f"exit code {run['rc']}: {tail(run['output'])}"})
        s.end_part(entry, t0)
        return
    sub = json.loads(js.read_text())
    for part in sub["parts"].values():
        for r in part["rows"]:
            r.pop("map", None)  # the deviation maps stay in vs_maisi's own JSON and picture
    entry["summary"]["vs_maisi"] = sub
    for key, part in sub["parts"].items():
        for r in part["rows"]:
            s.add(entry, {**{k: v for k, v in r.items() if k != "key"}, "name": f"vs_maisi {key}: {r['key']}"})
    if run["rc"] != 0 or run["timed_out"]:
        s.add(entry, {"name": "vs_maisi", "error": f"exit code {run['rc']}"
                      f"{' (killed at its share)' if run['timed_out'] else ''}: {tail(run['output'])}"})
    if not s.dry:  # the dry run writes only the suite's files to --out
        for folder_out in s.targets:
            for suffix in (".json", ".md", ".png"):
                src = stem.with_suffix(suffix)
                if src.is_file():
                    (folder_out / src.name).write_bytes(src.read_bytes())
    s.end_part(entry, t0)


PARTS = {1: part1, 2: part2, 3: part3, 4: part4, 5: part5, 6: part6}


# ================================================================================================ Markdown
def _mib(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"


def _f(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def render(report: dict[str, Any]) -> str:
    su = report["suite"]
    lines = [f"# GPU suite{' (dry run on the CPU: code paths only, tiny sizes)' if su['dry_run'] else ''}", "",
             _common.machine_line(report["machine"]), "", f"Command: `{su['command']}`  ",
             f"Budget {su['budget_min']} min; ran {su.get('seconds', 0) / 60:.1f} min. Each part's status: "
             + ", ".join(f"{k} {p['status']}" for k, p in report["parts"].items()) + ".", ""]
    for key, p in report["parts"].items():
        lines += [f"## {key}. {p['title']}", "",
                  f"Status **{p['status']}**, {_f(p.get('seconds'), 0)} s of a {p['time_share_s']:.0f} s share.", ""]
        errors = [i for i in p["items"] if i.get("error")]
        if key == "1":
            rows = [[i["name"], i.get("exit_code", "-"), _f(i.get("s_per_step"), 3), _mib(i.get("peak_mib"))]
                    for i in p["items"] if "stage" in i]
            lines += [_common.markdown_table(["config / step", "exit", "s/step", "peak MiB (max allocated)"], rows), ""]
            for i in p["items"]:
                if i["name"].startswith("plan") and not i.get("error"):
                    rows = [[st, _mib(i[st]["plan_peak_mib"]), _mib(i[st]["plan_reserved_mib"]),
                             _mib(i[st]["plan_need_mib"]), i[st]["fits_24gb"], _mib(i[st]["fast_dev_run_peak_mib"]),
                             _f(i[st]["plan_over_measured"])] for st in ("autoencoder", "diffusion")]
                    lines += [f"`{i['name']}`:", "", _common.markdown_table(
                        ["stage", "plan peak MiB", "reserved MiB", "need MiB (+context)", "fits 24 GiB",
                         "fast_dev_run peak MiB", "plan / measured"], rows), ""]
                if i["name"] == "CUDA context" and not i.get("error") and "context_mib" not in i:
                    lines += [f"CUDA context: {i.get('note')}.", ""]
                elif i["name"] == "CUDA context" and not i.get("error"):
                    lines += [f"CUDA context: {_mib(i.get('context_mib'))} MiB in use on the device beyond the "
                              f"allocator's {_mib(i.get('reserved_mib'))} MiB reserved, after cuBLAS and cuDNN "
                              f"kernels ran (plan allows 1,024 MiB).", ""]
        elif key == "2":
            rows = [[PART2_LABELS.get(i.get("model"), i.get("model")), i.get("precision"), _mib(i.get("peak_mib")),
                     _f(i.get("step_s"), 3), _f(i.get("memory_ratio")), _f(i.get("time_ratio")),
                     f"{SEED_A100[i['factor']][0]} GB / {SEED_A100[i['factor']][1]}" if i.get("factor") in SEED_A100
                     and i.get("model", "").startswith(("4x", "8x", "16x")) else ""]
                    for i in p["items"] if not i.get("error")]
            lines += [f"Input {p['summary'].get('size')}, batch 1, one training step (forward, L1 + KL, backward, "
                      "Adam), attention through SDPA (MAISI has none); peak = max allocated above the built model "
                      "and input; ratios to MONAI core 4x fp32. "
                      "Seed 002's A100 figures (AMP) beside: memory, and speed-up over 4x (time ratio = its "
                      "inverse).", "",
                      _common.markdown_table(["model", "precision", "peak MiB", "s/step", "memory ratio",
                                              "time ratio", "seed A100: memory / speed-up"], rows), ""]
        elif key == "3":
            rows = [[i["name"], _mib(i.get("peak_mib")), _f(i.get("seconds"), 1),
                     (f"error {i['max_rel_error']:.1e} (mean {i['mean_rel_error']:.1e}); " if "max_rel_error" in i
                      else "") + i.get("note", "")] for i in p["items"] if not i.get("error")]
            lines += [f"MAISI's published figure: {MAISI_512['gb']} GB, ~{MAISI_512['seconds']:.0f} s for a 512^3 "
                      "decode on an A100.", "", _common.markdown_table(["pass", "peak MiB", "seconds", "note"], rows),
                      ""]
        elif key == "4":
            for i in p["items"]:
                ev = i.get("evaluation")
                if ev:
                    rows = []
                    for block in ("samples_vs_real", "samples_vs_recon", "recon_vs_real"):
                        b = ev.get(block) or {}
                        rows.append([block, _f(b.get("c2st_accuracy")), _f(b.get("histogram_w1"), 4),
                                     _f(b.get("mmd"), 4), _f(b.get("nn_ratio"))])
                    v = ev.get("stage1_validation") or {}
                    lines += [f"Stage 1 validation: PSNR {_f(v.get('psnr'))} dB, SSIM {_f(v.get('ssim'), 3)}.", "",
                              _common.markdown_table(["comparison", "C2ST", "histogram W1", "MMD", "nn ratio"], rows),
                              "", f"CPU quality table for comparison: {p['summary'].get('cpu_table')}.", ""]
                if i.get("picture"):
                    lines += [f"![real / reconstructed / generated]({i['picture']})", ""]
            rows = [[i["name"], i.get("global_step", "-"), i.get("epochs", "-"), _f(i.get("seconds"), 0)]
                    for i in p["items"] if i["name"].startswith("stage")]
            if rows:
                lines += [_common.markdown_table(["run", "optimizer steps", "epochs", "seconds"], rows), ""]
        elif key == "5":
            rows = [[i["name"], i.get("steps", "-"), _f(i.get("seconds_per_volume"), 2), _mib(i.get("peak_mib"))]
                    for i in p["items"] if not i.get("error")]
            lines += [f"Latent {p['summary'].get('latent')}, one volume at a time, decoded; median of the repeats.",
                      "", _common.markdown_table(["sampler", "steps", "s / volume", "peak MiB"], rows), ""]
        elif key == "6" and p["summary"].get("vs_maisi"):
            import vs_maisi

            sub = vs_maisi.render(p["summary"]["vs_maisi"]).splitlines()
            start = next((n + 1 for n, ln in enumerate(sub) if ln.startswith("Command:")), 0)
            lines += ["`benchmarks/vs_maisi.py`'s tables (its own files: `vs_maisi_cuda.{json,md,png}`):", ""]
            end = next((n for n, ln in enumerate(sub) if ln == "## Errors"), len(sub))  # the suite lists errors
            lines += [("#" + ln) if ln.startswith("## ") else ln for ln in sub[start:end]] + [""]
        if errors:
            lines += ["Errors:", ""] + [f"- {i['name']}: {str(i['error'])[:600]}" for i in errors] + [""]
    return "\n".join(lines)


# ================================================================================================ workers
def _device(name: str) -> Any:
    import torch

    dev = torch.device(name)
    if dev.type == "cuda":
        torch.cuda.init()
    return dev


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def worker_data(p: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    folder = Path(p["folder"])
    a = app()
    (folder / "train").mkdir(parents=True, exist_ok=True)
    train, _ = a.make_synthetic_dataset(folder / "train", p["num_train"], 0, p["size"], seed=0, kind=p["kind"])
    val, _ = a.make_synthetic_dataset(folder / "val", p["num_val"], 0, p["size"], seed=1, kind=p["kind"])
    return {"files": len(train) + len(val), "seconds": round(time.perf_counter() - t0, 1)}


def worker_smoke(p: dict[str, Any]) -> dict[str, Any]:
    """The CLI entry points in this one process, one step after the other, each between markers."""
    a = app()
    config = Path(p["config"])
    mains = {"stage1": a.train_autoencoder_main, "stage2": a.train_diffusion_main}
    codes = {}
    d = p["data"]
    folder = Path(d["folder"])
    if not (folder / "val").is_dir():
        a.make_synthetic_dataset(folder / "train", d["num_train"], 0, d["size"], seed=0, kind=d["kind"])
        a.make_synthetic_dataset(folder / "val", d["num_val"], 0, d["size"], seed=1, kind=d["kind"])
    for name, stage, fdr, extra in p["steps"]:
        print(f"@@ begin {name}", flush=True)
        argv = cli_args(config, [*p["sets"], *extra]) + (["--fast-dev-run"] if fdr else [])
        try:
            code = mains[stage](argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # a crash is a result here: report it and go on with the next step
            import traceback

            traceback.print_exc()
            print(f"crashed: {type(exc).__name__}: {exc}", flush=True)
            code = 1
        sys.stdout.flush()
        print(f"\n@@ end {name} {code}", flush=True)
        codes[name] = code
    if p.get("context"):
        emit({"name": "CUDA context", **cuda_context(p["device"])})
    return {"codes": codes}


def _build(model: str, dry: bool) -> Any:
    import autoencoder_bench as bench

    if model == "maisi":
        return maisi(dry, norm_float16=False)
    # SDPA attention (use_flash_attention, as the 8x config sets it): without it MONAI core's 4x keeps
    # 65,536 x 65,536 attention matrices at 256 x 256 x 64 (16 GiB each in fp32) and measures its attention, not its
    # factors. Precision comes from autocast in the step.
    return bench.build_autoencoder(model, "fp32+sdpa")


def worker_step(p: dict[str, Any]) -> dict[str, Any]:
    """One autoencoder training step per model and precision (autoencoder_bench.train_step), peak and time."""
    import statistics

    import torch

    import autoencoder_bench as bench
    from monai_diffusion.memory import MIB, PeakMeter

    dev = _device(p["device"])
    net = opt = x = None
    for model in p["models"]:
        for precision in p["precisions"]:
            row: dict[str, Any] = {"model": model, "precision": precision,
                                   "factor": {"core-4x": "4x", "4x": "4x", "8x": "8x", "16x-8-2": "16x",
                                              "maisi": "4x"}[model]}
            try:
                torch.manual_seed(0)
                net = _build(model, p.get("dry", False)).to(dev)
                opt = torch.optim.Adam(net.parameters(), lr=1e-4)
                shape = p["maisi_size"] if model == "maisi" else p["size"]
                x = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(0)).to(dev)
                for _ in range(p["warmup"]):
                    bench.train_step(net, opt, x, precision)
                _sync(dev)
                meter = PeakMeter(dev)
                meter.start()
                base = torch.cuda.memory_allocated(dev) / MIB if dev.type == "cuda" else meter.rss_mib()
                times = []
                for _ in range(p["steps"]):
                    _sync(dev)
                    t0 = time.perf_counter()
                    bench.train_step(net, opt, x, precision)
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
                peak = meter.peak_mib() - base if dev.type == "cuda" else meter.rise_mib()
                row.update(peak_mib=peak, step_s=statistics.median(times), base_mib=base, input=list(shape),
                           reserved_mib=meter.reserved_mib or None,
                           parameters=sum(q.numel() for q in net.parameters()))
            except Exception as exc:  # noqa: BLE001 - an OOM or a kernel error is this row's result
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            finally:
                net = opt = x = None  # noqa: F841
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            emit(row)
    return {}


def worker_decode(p: dict[str, Any]) -> dict[str, Any]:
    """Part 3 in one process: our exact tiled decode (and its error against the whole decode, TF32 off), or
    MAISI's decoder with its own splitting (fp16 autocast, as MAISI infers)."""
    import torch

    from monai_diffusion.memory import MIB, PeakMeter

    dev = _device(p["device"])

    def measure(name: str, fn: Any, note: str) -> Any:
        row: dict[str, Any] = {"name": name, "note": note}
        out = None
        try:
            meter = PeakMeter(dev)
            meter.start()
            base = torch.cuda.memory_allocated(dev) / MIB if dev.type == "cuda" else meter.rss_mib()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn()
            _sync(dev)
            row["seconds"] = time.perf_counter() - t0
            row["peak_mib"] = meter.peak_mib() - base if dev.type == "cuda" else meter.rise_mib()
            row["output_shape"] = list(out.shape)
        except Exception as exc:  # noqa: BLE001 - OOM is a result
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        emit(row)
        return out

    size = p["size"]
    if "ours" in p["which"]:
        from generative.networks.nets import AutoencoderKL
        from tiling import RECIPE_8X

        torch.manual_seed(0)
        model = AutoencoderKL(**RECIPE_8X).eval().to(dev)
        # exactness: TF32 off, so that both passes are fp32 and the bound is fp32 rounding
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        c = p["check_size"]
        z = torch.randn(model.latent_shape((1, 1, c, c, c)), generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            whole = model.decode(z)
            # tiles of about 5/8 of the volume (a multiple of 8): they do not divide it
            tiled = model.decode_tiled(z, tile_size=(max(8, c * 5 // 8 // 8 * 8),) * 3)
        diff = (tiled - whole).abs()
        check = {"name": f"exactness: tiled vs whole decode at {c}^3 (TF32 off)",
                 "max_rel_error": float(diff.max() / whole.std()), "mean_rel_error": float(diff.mean() / whole.std()),
                 "note": "fp32, TF32 off: largest absolute difference / std of the whole decode (bound 1e-4)"}
        if check["max_rel_error"] > 1e-4:
            check["error"] = f"tiled decode differs by {check['max_rel_error']:.2e} x std (bound 1e-4)"
        emit(check)
        del whole, tiled, diff
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, for the timing
        latent = torch.randn(model.latent_shape((1, 1, size, size, size))).to(dev)
        measure(f"ours: 8x recipe, exact tiles of {p['tile']}^3, fp32", lambda: model.decode_tiled(
            latent, tile_size=(p["tile"],) * 3), f"latent {list(latent.shape[2:])} x {latent.shape[1]}")
        measure(f"ours: 8x recipe, exact tiles of {p['tile']}^3, bf16 autocast", lambda: _autocast(
            dev, torch.bfloat16, lambda: model.decode_tiled(latent, tile_size=(p["tile"],) * 3)), "")
        del model, latent
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "maisi" in p["which"]:
        torch.manual_seed(0)
        cuda = dev.type == "cuda"
        model = maisi(p.get("dry", False), norm_float16=cuda).eval().to(dev)
        latent = torch.randn(1, 4, *(n // 4 for n in p["maisi_size"])).to(dev)
        dtype = torch.float16 if cuda else torch.bfloat16
        splits = (DRY_MAISI_ARGS if p.get("dry") else MAISI_ARGS)["num_splits"]
        measure(f"MAISI decoder, num_splits {splits}, dim_split {MAISI_ARGS['dim_split']}, "
                f"{'fp16' if dev.type == 'cuda' else 'bf16'} autocast",
                lambda: _autocast(dev, dtype, lambda: model.decode(latent)),
                f"latent {list(latent.shape[2:])} x 4 (MAISI is 4x)")
    return {}


def _autocast(dev: Any, dtype: Any, fn: Any) -> Any:
    import torch

    with torch.autocast(device_type=dev.type, dtype=dtype):
        return fn()


def worker_sample(p: dict[str, Any]) -> dict[str, Any]:
    """Seconds per volume of each sampler, through the app's Sampler (the one sampling path)."""
    import statistics

    import torch

    from monai_diffusion.memory import PeakMeter

    a = app()
    for sampler, steps in p["samplers"]:
        row: dict[str, Any] = {"name": f"{sampler}-{steps}", "steps": steps}
        try:
            sets = [*p["sets"], f"sampling.scheduler={sampler}", f"sampling.num_inference_steps={steps}",
                    "sampling.batch_size=1", *(["diffusion.scheduler.type=rflow"] if sampler == "rflow" else [])]
            settings = a.load_settings(p["config"], sets, stage="sampling")
            # rectified flow samples a model trained with it; DDPM and DDIM the DDPM-trained one
            smp = a.Sampler(settings, p["checkpoints"]["rflow" if sampler == "rflow" else "ddpm"])
            dev = torch.device(smp.device)
            if p.get("warmup", True):
                smp.sample(1, seed=0, progress=False)  # warm-up: kernels, cuDNN autotuning
            meter = PeakMeter(dev)
            meter.start()
            times = []
            for r in range(p["repeats"]):
                _sync(dev)
                t0 = time.perf_counter()
                smp.sample(1, seed=r + 1, progress=False)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            row["seconds_per_volume"] = statistics.median(times)
            row["peak_mib"] = meter.peak_mib()
            row["sampler"] = smp.describe()
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        emit(row)
    return {}


def cuda_context(device: str) -> dict[str, Any]:
    """The device memory a CUDA process uses beyond the allocator's reserved memory once cuBLAS and cuDNN ran
    (measured after the smoke runs of the same process, so all their kernels are loaded)."""
    import torch

    dev = _device(device)
    x = torch.randn(1, 8, 16, 16, 16, device=dev)
    conv = torch.nn.Conv3d(8, 8, 3, padding=1).to(dev)
    y = conv(x).sum() + (x.flatten(1) @ x.flatten(1).T).sum()
    y.backward()
    _sync(dev)
    if dev.type != "cuda":
        return {"note": "no CUDA device: nothing to measure (dry run)"}
    free, total = torch.cuda.mem_get_info(dev)
    used = (total - free) / 2**20
    reserved = torch.cuda.memory_reserved(dev) / 2**20
    return {"device_used_mib": used, "reserved_mib": reserved, "context_mib": used - reserved,
            "note": "device memory in use (all processes) minus this process's reserved memory"}


WORKERS = {"data": worker_data, "smoke": worker_smoke, "step": worker_step, "decode": worker_decode,
           "sample": worker_sample}


# ================================================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget-min", type=float, default=9.0, help="total minutes for all parts (default 9)")
    p.add_argument("--out", help="folder for the results, the picture and the log (the dry run writes only here)")
    p.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at tiny sizes")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], choices=[1, 2, 3, 4, 5, 6])
    p.add_argument("--work", help="folder for data, runs and checkpoints (default: a new temporary folder)")
    p.add_argument("--worker", nargs=2, metavar=("NAME", "JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        name, payload = args.worker
        result = WORKERS[name](json.loads(payload))
        print("SUITE-RESULT " + json.dumps(result), flush=True)
        return 0
    if args.dry_run and not args.out:
        print("error: --dry-run writes only to --out DIR; give one", file=sys.stderr)
        return 2
    if not args.budget_min > 0:
        print(f"error: --budget-min must be > 0, got {args.budget_min}", file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device is visible to PyTorch; use --dry-run to check the suite on a CPU",
                  file=sys.stderr)
            return 2
    args.parts = sorted(set(args.parts))
    suite = Suite(args)
    print(_common.machine_line(suite.machine), flush=True)
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            PARTS[part](suite)
        except Exception as exc:  # noqa: BLE001 - a bug in one part must not cost the others
            entry = suite.report["parts"].setdefault(str(part), {"title": TITLES[part], "items": [],
                                                                 "time_share_s": 0.0, "summary": {}})
            entry["items"].append({"name": "suite", "error": f"{type(exc).__name__}: {exc}"})
            entry["status"] = "error"
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            suite.save()
            print(f"   part {part}: suite error {type(exc).__name__}: {exc}", flush=True)
    suite.save()
    print(f"\nDone in {(time.perf_counter() - suite.start) / 60:.1f} min of {args.budget_min:g}. Results:")
    for folder in suite.targets:
        for suffix in (".json", ".md"):
            print(f"  {folder / (suite.stem + suffix)}")
        if suite.pictures:
            print(f"  {folder / (suite.stem + '_quality.png')}")
    print(f"  log: {suite.log}\n  runs, data and checkpoints: {suite.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
