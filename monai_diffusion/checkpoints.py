"""Checkpoint files: the format, writing them atomically, opening and checking them, finding a run's newest one, and
the never-overwrite rule of a run's output folder.

A checkpoint is a dict with the format marker :data:`CHECKPOINT_FORMAT`, a format version, the stage that wrote it,
the network weights and constructor arguments, optimizer and gradient-scaler states, the loop's position (epoch,
global step, best metric, history) and the stage's settings; a step checkpoint adds the position inside the epoch.
Files in a run folder: ``latest_checkpoint.pt`` and ``best_model.pt`` (epoch ends) and
``step_checkpoint_<step>.pt`` (every N optimizer steps).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import RunError
from .fileio import atomic_write
from .runtime import Runtime

CHECKPOINT_FORMAT = "monai-diffusion-checkpoint"
# 2: model_args hold the architecture only (no execution knobs); 3: only tensors and plain values, so that every
# checkpoint loads with ``torch.load(weights_only=True)`` (versions 1 and 2 may hold pickled objects: NumPy's random
# state in step checkpoints; :func:`convert_checkpoint` rewrites them)
CHECKPOINT_VERSION = 3
CONVERT_COMMAND = "monai-diffusion-convert-checkpoint"
_PLAIN = (str, int, float, bool, type(None))

# what each stage's checkpoint must hold; anything less is an older or foreign format
REQUIRED_KEYS = {
    "autoencoder": ("state_dict", "model_args", "epoch", "global_step", "optimizers"),
    "diffusion": ("state_dict", "model_args", "epoch", "global_step", "optimizers", "scheduler_args",
                  "scale_factor", "latent_shape", "autoencoder", "lr_scheduler"),
}

# step checkpoints: step_checkpoint_<global step, 8 digits>.pt beside latest_checkpoint.pt and best_model.pt
STEP_CHECKPOINT = re.compile(r"^step_checkpoint_(\d+)\.pt$")
_CHECKPOINT_NAME = r"(?:latest_checkpoint|best_model|step_checkpoint_\d+)\.pt"
# a checkpoint being written: fileio.atomic_target's ".tmp-<pid>-<name>", and ".<name>.tmp-<pid>" of earlier versions
_OWN_TMP = re.compile(rf"^\.tmp-(?P<pid>\d+)-{_CHECKPOINT_NAME}$|^\.{_CHECKPOINT_NAME}\.tmp-(?P<old_pid>\d+)$")


# --------------------------------------------------------------------------------------------- writing
def unsafe_entries(obj: Any, where: str = "") -> list[str]:
    """The key paths in ``obj`` whose values are neither tensors nor plain data (dict, list, tuple, str, int, float,
    bool, None): what ``torch.load(weights_only=True)`` would refuse to read back."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return []
    if isinstance(obj, dict):
        found = []
        for key, value in obj.items():
            if not isinstance(key, _PLAIN):
                found.append(f"{where}[{key!r}] (key of type {type(key).__name__})")
            found += unsafe_entries(value, f"{where}.{key}" if where else str(key))
        return found
    if isinstance(obj, (list, tuple)):
        return [entry for i, value in enumerate(obj) for entry in unsafe_entries(value, f"{where}[{i}]")]
    return [f"{where or '<top>'} ({type(obj).__module__}.{type(obj).__name__})"]


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one.

    Raises:
        TypeError: ``obj`` holds something other than tensors and plain data (a bug of the caller: such a file
            would need unpickling code to be read).
    """
    bad = unsafe_entries(obj)
    if bad:
        raise TypeError(f"refusing to write {path}: a checkpoint holds only tensors and plain data, but these are "
                        f"not: {', '.join(bad[:5])}")
    atomic_write(path, lambda f: torch.save(obj, f))


def write_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """:func:`atomic_save` whose failure (full disk, quota, permissions) is a one-line :class:`RunError`; the
    previous file at ``path`` is left as it was and the partial file is removed."""
    try:
        atomic_save(ckpt, path)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        why = exc.strerror or str(exc) or type(exc).__name__
        previous = f"the previous {path.name} is intact" if path.exists() else "the earlier checkpoints are intact"
        raise RunError(f"cannot write checkpoint {path}: {why}{f' ({code})' if code else ''}; {previous} and the "
                       "partial file was removed. Free some space (or fix the folder's permissions) and resume "
                       "with resume_from=latest") from None


# --------------------------------------------------------------------------------------------- reading
def read_tensors_file(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data only, so that opening a file someone
    sent you never runs code. Every failure is a one-line :class:`RunError` naming the file; a file that holds
    pickled objects is refused before any of them is built, with the command that converts an older checkpoint of
    this project (for files you trust).

    ``mmap``: map the file instead of reading it (``torch.load(mmap=True)``), so that only the tensors used are paged
    in: sampling from a stage-2 checkpoint then never holds its optimizer states in memory. A file of the old,
    non-zip format is read whole."""
    import pickle

    path = Path(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc).lower():
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RunError(f"cannot read checkpoint {path} (truncated or not a PyTorch file?): {first}") from None
        raise RunError(
            f"{path} holds pickled Python objects, which could run code when opened, so it is not loaded (only tensors "
            "and plain values are read). If it is a checkpoint of an older monai-diffusion and you trust where it "
            f"came from, convert it once: {CONVERT_COMMAND} {path} NEW.pt"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other reading failure means the same thing to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"cannot read checkpoint {path} (truncated or not a PyTorch file?): {first}") from None


def load_checkpoint(path: str | Path, expected_stage: str | None = None, mmap: bool = False) -> dict[str, Any]:
    """Open a checkpoint written by this project; every problem is a one-line :class:`RunError` naming the path.

    The file is read with ``weights_only=True`` (:func:`read_tensors_file`): nothing in it can run code. Checks the
    format marker, the format version (1, whose model arguments still held the execution knobs, 2 and the current
    one are read, as long as they hold only tensors and plain values), the stage, and that the keys the stage needs
    are there.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    ckpt = read_tensors_file(path, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(
            f"{path} is not a monai-diffusion checkpoint (no '{CHECKPOINT_FORMAT}' marker); expected a "
            "latest_checkpoint.pt or best_model.pt written by this project."
        )
    version = ckpt.get("version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise RunError(f"{path} has checkpoint format version {version!r}; this monai-diffusion reads versions 1 to "
                       f"{CHECKPOINT_VERSION} (a newer version wrote it? upgrade monai-diffusion)")
    stage = ckpt.get("stage")
    if expected_stage is not None and stage != expected_stage:
        raise RunError(f"{path} is a '{stage}' checkpoint, expected a '{expected_stage}' checkpoint.")
    missing = [k for k in REQUIRED_KEYS.get(stage, ()) if k not in ckpt]
    if missing:
        raise RunError(f"{path} is a '{stage}' checkpoint of an older or incomplete format: it lacks "
                       f"{', '.join(repr(k) for k in missing)}")
    return ckpt


def load_weights(model: nn.Module, state_dict: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict`` with a one-line :class:`RunError` naming the checkpoint when it does not fit."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RunError(f"the weights in {path} do not fit the network it describes: {first}") from None


def check_same_architecture(saved: dict[str, Any], current: dict[str, Any], stage_name: str,
                            path: str | Path) -> None:
    """Refuse weights of another architecture, naming each argument that differs.

    Args:
        saved: the checkpoint's architecture arguments (its ``model_args`` without the execution knobs).
        current: the architecture the settings build.
        stage_name: the stage, for the message.
        path: the checkpoint, for the message.
    """
    if saved == current:
        return
    diff = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} in the settings"
                     for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))
    raise RunError(f"{path} holds a {stage_name} network of another architecture ({diff}); use the settings it was "
                   "trained with (the config.yaml in its folder)")


# ---------------------------------------------------------------------------------------- step checkpoints
def step_checkpoint_path(output_dir: Path, global_step: int) -> Path:
    """Where the step checkpoint of optimizer step ``global_step`` goes."""
    return Path(output_dir) / f"step_checkpoint_{global_step:08d}.pt"


def step_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The step checkpoints in ``output_dir`` as (step, path), oldest first (by the step in the name)."""
    if not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := STEP_CHECKPOINT.match(p.name))]
    return sorted(found)


def prune_step_checkpoints(output_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (nothing else, ever). Returns what was deleted."""
    if keep_last is None:
        return []
    old = [path for _, path in step_checkpoints(output_dir)[:-keep_last]]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def remove_stale_temporaries(output_dir: Path, runtime: Runtime) -> list[Path]:
    """Remove half-written checkpoint files (``.tmp-<pid>-<name>.pt``) that a killed process of this machine left
    in ``output_dir`` (rank 0 only; a file whose writer is still alive is kept). Returns what was removed."""
    removed: list[Path] = []
    if not runtime.is_main or not Path(output_dir).is_dir():
        return removed
    for path in Path(output_dir).iterdir():
        m = _OWN_TMP.match(path.name)
        if m is None:
            continue
        pid = int(m.group("pid") or m.group("old_pid"))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # its writer is still alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        runtime.print(f"removed {path.name}: a checkpoint that a killed run had not finished writing")
    return removed


# ------------------------------------------------------------------------------------- a run's output folder
class RunFolder(Protocol):
    """What :func:`resolve_resume` and :func:`prepare_output_dir` read of the loop's settings (``LoopConfig``)."""

    output_dir: Path
    resume_from: Path | str | None  # a checkpoint, "latest", or None for a new run
    start_fresh_if_none: bool
    fast_dev_run: bool
    section: str  # settings section, for messages that name config keys


Folder = TypeVar("Folder", bound=RunFolder)


def find_latest_checkpoint(output_dir: Path, expected_stage: str | None,
                           say: Callable[[str], None] = print) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of a run folder, by global step: ``latest_checkpoint.pt``, ``best_model.pt``
    and ``step_checkpoint_*.pt``. At equal steps an epoch-end checkpoint wins over a step checkpoint (it has the
    validation done). A file that cannot be read (truncated, corrupt, another stage) is skipped with a message.

    Returns:
        The path (None when there is none) and the names of the files skipped, with why.
    """
    output_dir = Path(output_dir)
    best: tuple[tuple[int, int, int], Path] | None = None
    skipped: list[str] = []

    def consider(path: Path, preference: int) -> bool:
        nonlocal best
        try:
            ckpt = load_checkpoint(path, expected_stage)
        except RunError as exc:
            skipped.append(f"{path.name} ({exc})")
            say(f"resume_from=latest: skipping {path}: {exc}")
            return False
        key = (int(ckpt["global_step"]), preference, int(ckpt["epoch"]))
        if best is None or key > best[0]:
            best = (key, path)
        return True

    for preference, name in ((2, "latest_checkpoint.pt"), (1, "best_model.pt")):
        if (output_dir / name).is_file():
            consider(output_dir / name, preference)
    for step, path in reversed(step_checkpoints(output_dir)):
        if best is not None and step < best[0][0]:
            break  # older than what was found already
        if consider(path, 0):
            break  # the newest readable step checkpoint; the rest are older
    return (best[1] if best else None), skipped


def resolve_resume(cfg: Folder, runtime: Runtime, expected_stage: str | None) -> Folder:
    """``resume_from: latest`` -> the newest complete checkpoint in ``cfg.output_dir`` (or None with
    ``start_fresh_if_none`` when there is none); any other value is returned unchanged. Under DDP rank 0 chooses
    and tells the others, so that every process resumes the same file.

    Args:
        cfg: the loop's settings (a dataclass; a copy with ``resume_from`` resolved is returned).

    Raises:
        RunError: there is no readable checkpoint (naming the folder and every file skipped), unless
            ``start_fresh_if_none`` and the folder holds no checkpoint at all.
    """
    if cfg.resume_from != "latest":
        return cfg
    choice: list[Any] = [None, ""]  # the path (as text) or None, and an error message
    if runtime.is_main:  # rank 0 chooses, so that every process resumes the same file
        try:
            path = _choose_latest(cfg, runtime, expected_stage)
            choice = [None if path is None else str(path), ""]
        except RunError as exc:
            choice = [None, str(exc)]
    if runtime.distributed:
        dist.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise RunError(choice[1])
    return dataclasses.replace(cfg, resume_from=None if choice[0] is None else Path(choice[0]))


def _choose_latest(cfg: RunFolder, runtime: Runtime, expected_stage: str | None) -> Path | None:
    key = f"{cfg.section}.checkpoints.resume_from"
    path, skipped = find_latest_checkpoint(cfg.output_dir, expected_stage, runtime.print)
    if path is not None:
        remove_stale_temporaries(cfg.output_dir, runtime)
        runtime.print(f"{key}=latest: {path}")
        return path
    if skipped:
        raise RunError(f"{key}=latest: no complete checkpoint in {cfg.output_dir}; unreadable: {'; '.join(skipped)}")
    if cfg.start_fresh_if_none:
        runtime.print(f"{key}=latest: no checkpoint in {cfg.output_dir} yet; starting a new run "
                      f"({cfg.section}.checkpoints.start_fresh_if_none)")
        remove_stale_temporaries(cfg.output_dir, runtime)
        return None
    raise RunError(f"{key}=latest: {cfg.output_dir} holds no checkpoint to resume (latest_checkpoint.pt, "
                   f"best_model.pt or step_checkpoint_*.pt); to start a new run there set {key}=null, or set "
                   f"{cfg.section}.checkpoints.start_fresh_if_none=true to do so whenever none exists")


def prepare_output_dir(cfg: RunFolder, runtime: Runtime) -> None:
    """Refuse to start a fresh run where another run left checkpoints; never delete anything.

    Resuming may write into the folder of the checkpoint it resumes, and into an empty folder, but not into a
    folder that holds some other run. ``fast_dev_run`` writes nothing, so it is never refused.
    """
    if cfg.fast_dev_run:
        return
    existing = [cfg.output_dir / n for n in ("latest_checkpoint.pt", "best_model.pt") if (cfg.output_dir / n).exists()]
    existing += [path for _, path in step_checkpoints(cfg.output_dir)][-1:]
    if cfg.resume_from == "latest":
        return  # resolve_resume picks a checkpoint of this folder, or starts fresh only where there is none
    if cfg.resume_from is not None:
        if existing and Path(cfg.resume_from).resolve().parent != cfg.output_dir.resolve():
            raise RunError(
                f"{cfg.section}.checkpoints.output_dir {cfg.output_dir} holds another run than the one resumed from "
                f"{cfg.resume_from}; nothing was changed. Resume into the checkpoint's own folder or an empty one."
            )
        return
    if existing:
        raise RunError(
            f"{cfg.output_dir} already holds a run ({', '.join(p.name for p in existing)}); nothing was changed. "
            f"To continue it, add --set {cfg.section}.checkpoints.resume_from=latest; "
            f"to start a new run, choose another {cfg.section}.checkpoints.output_dir."
        )


# --------------------------------------------------------------------------------------------- converting
def _to_safe(value: Any) -> Any:
    """``value`` with NumPy's random-state tuples in :func:`~monai_diffusion.runtime.rng_state`'s form, other NumPy
    arrays as tensors, NumPy scalars as numbers, dataclasses and paths as plain data; anything else unchanged."""
    import numpy as np

    from .fileio import plain

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {k: _to_safe(v) for k, v in value.items()}
    if (isinstance(value, tuple) and len(value) == 5 and value[0] == "MT19937"
            and isinstance(value[1], np.ndarray)):
        kind, key, pos, has_gauss, gauss = value
        return {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64)),
                "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_safe(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type) or isinstance(value, os.PathLike):
        return plain(value)
    return value


def convert_checkpoint(old: str | Path, new: str | Path) -> Path:
    """Rewrite a checkpoint of an older monai-diffusion (format 1 or 2) in the current, safe format: tensors and plain
    values only, so that it loads with ``weights_only=True`` from then on.

    ONLY FOR FILES YOU TRUST: reading the old file unpickles it (``weights_only=False``), which runs whatever code it
    holds. The new file is written atomically and never over an existing one; the old file is left as it is.

    Raises:
        RunError: ``old`` missing, unreadable, not a monai-diffusion checkpoint, or holding something that has no
            plain form.
        FileExistsError: ``new`` exists.
    """
    from .fileio import refuse_existing

    old, new = Path(old).expanduser(), Path(new).expanduser()
    if not old.is_file():
        raise RunError(f"checkpoint not found: {old}" + (" (it is a folder)" if old.is_dir() else ""))
    refuse_existing([new], hint="the converter never replaces a file: choose another NEW")
    try:
        ckpt = torch.load(old, map_location="cpu", weights_only=False)  # the user's explicit step of trust
    except Exception as exc:  # noqa: BLE001 - any reading failure means the same thing to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"cannot read checkpoint {old} (truncated or not a PyTorch file?): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{old} is not a monai-diffusion checkpoint (no '{CHECKPOINT_FORMAT}' marker): only this "
                       "project's own checkpoints are converted")
    version = ckpt.get("version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise RunError(f"{old} has checkpoint format version {version!r}; this monai-diffusion converts versions 1 "
                       f"to {CHECKPOINT_VERSION}")
    safe = _to_safe(ckpt)
    safe["version"] = CHECKPOINT_VERSION
    bad = unsafe_entries(safe)
    if bad:
        raise RunError(f"{old} holds values with no plain form, so it cannot be converted: {', '.join(bad[:5])}")
    write_checkpoint(safe, new)
    return new


# --------------------------------------------------------------------------------------------- a model folder
MODEL_FOLDER_FORMAT = "monai-diffusion-model-folder"
_MODEL_JSON = "diffusion.json"
# what a model folder leaves out of a stage-2 checkpoint: training state, and the weights (in their own files)
_TRAINING_ONLY = ("state_dict", "optimizers", "scalers", "lr_scheduler", "history", "skipped_batches")


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError:
        return None
    return st


def write_model_folder(ckpt: dict[str, Any], settings: dict[str, Any], folder: str | Path,
                       use_ema: bool = True) -> list[Path]:
    """Write the inference part of a stage-2 checkpoint into ``folder`` with no pickled code: the UNet's weights
    (the EMA weights when present and ``use_ema``) and the autoencoder's as ``unet.safetensors`` /
    ``autoencoder.safetensors`` when the ``safetensors`` package is installed, else as weights-only ``.pt`` state
    dicts (tensors only; read with ``weights_only=True``), and ``diffusion.json``: the architectures, scheduler,
    scale factor, latent shape, data geometry, conditioning and ``settings`` as JSON. Returns the files written
    (atomically; an existing file is replaced only by the complete new one)."""
    from .fileio import atomic_write_json, plain

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st = _safetensors()
    suffix = ".safetensors" if st is not None else ".pt"
    ema = ckpt["state_dict"].get("ema") if use_ema else None
    weights = {"unet": ema if ema is not None else ckpt["state_dict"]["unet"]}
    if ckpt.get("autoencoder") is not None:
        weights["autoencoder"] = ckpt["autoencoder"]["state_dict"]
    written, files = [], {}
    for name, state in weights.items():
        path = folder / f"{name}{suffix}"
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        if st is not None:
            atomic_write(path, lambda f, t=tensors: f.write(st.save(t)))
        else:
            atomic_save(tensors, path)
        files[name] = path.name
        written.append(path)
    meta = {k: v for k, v in ckpt.items() if k not in _TRAINING_ONLY and k != "autoencoder"}
    if ckpt.get("autoencoder") is not None:
        meta["autoencoder"] = {k: v for k, v in ckpt["autoencoder"].items() if k != "state_dict"}
    doc = {"format": MODEL_FOLDER_FORMAT, "version": 1, "weights": files, "checkpoint": plain(meta, json=True),
           "settings": plain(settings, json=True)}
    atomic_write_json(folder / _MODEL_JSON, doc)
    return [*written, folder / _MODEL_JSON]


def read_model_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(checkpoint dictionary, settings dictionary)`` of a folder written by :func:`write_model_folder`: the
    dictionary has a stage-2 checkpoint's keys and weights (``state_dict.unet`` and ``autoencoder.state_dict``), so
    that the networks are rebuilt as from the checkpoint. Weights are read without unpickling code (safetensors, or
    ``weights_only=True``). A missing or foreign folder is a one-line :class:`RunError` naming it."""
    import json

    folder = Path(folder)
    doc_path = folder / _MODEL_JSON
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {doc_path} (a model folder written by monai-diffusion-export-bundle): "
                       f"{exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FOLDER_FORMAT:
        raise RunError(f"{doc_path} is not a monai-diffusion model description (format {MODEL_FOLDER_FORMAT!r})")
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, file in doc["weights"].items():
        path = folder / file
        if not path.is_file():
            raise RunError(f"{path} is missing: {doc_path} names it as the {name} weights")
        if path.suffix == ".safetensors":
            st = _safetensors()
            if st is None:
                raise RunError(f"{path} is a safetensors file: install safetensors (pip install safetensors)")
            state[name] = st.load_file(str(path))
        else:
            state[name] = read_tensors_file(path)
    ckpt = dict(doc["checkpoint"])
    ckpt["state_dict"] = {"unet": state["unet"]}
    if "autoencoder" in state:
        ckpt["autoencoder"] = {**ckpt["autoencoder"], "state_dict": state["autoencoder"]}
    return ckpt, doc["settings"]
