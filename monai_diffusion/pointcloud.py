"""Point clouds in both directions, in physical units taken from the NIfTI affine.

**Export** (volume -> points): :func:`sample_points` draws exactly ``num_points`` points from a volume. Voxels whose
intensity ``v`` is above ``threshold`` are the candidates; a point is a candidate voxel index ``(i, j, k)``, drawn
with replacement, plus (for some methods) a uniform sub-voxel offset in ``[-0.5, 0.5)`` voxel per axis, mapped to
world coordinates by the affine: ``affine @ [i, j, k, 1]``. The methods:

* ``probabilistic``: probability proportional to ``v - threshold``, with jitter;
* ``center``: probability proportional to ``v``, no jitter (points sit on voxel centres);
* ``random``: every candidate equally likely, with jitter;
* ``weighted``: probability proportional to ``v``, with jitter.

:func:`write_points_csv` writes them with a header naming the unit (``x [nm],y [nm],z [nm]``),
:func:`write_points_ply` as binary PLY, and :func:`export_sample` does both for one generated sample.

**Import** (points -> volume): :func:`read_points` reads CSV tables (ThunderSTORM-style ``x [nm]`` headers,
``x_nm``, plain ``x``) and HDF5 files (with h5py); :func:`voxelize` bins points into a grid (occupancy, density
counts, or counts smoothed by a Gaussian) and returns the volume with its affine; :func:`voxelize_files` is the
``monai-diffusion-voxelize`` command's work.

A voxel ``i`` of a grid with lower corner ``origin`` and voxel size ``s`` covers ``[origin + i s, origin + (i+1) s)``;
its centre, ``origin + (i + 0.5) s``, is what the affine maps the index to. So an exported point with jitter lies
inside the voxel it came from, and voxelising it again puts it back there.

Every length in a NIfTI header, and every length this module takes or returns unless a unit is named, is in mm.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PointCloudError
from .settings import PointCloudSettings

__all__ = [
    "METHODS",
    "MODES",
    "UNITS",
    "PointCloudError",
    "voxel_to_world",
    "sample_points",
    "points_header",
    "write_points_csv",
    "write_points_ply",
    "read_points_csv",
    "export_sample",
    "read_points",
    "grid_from_extent",
    "voxelize",
    "voxelize_files",
]

METHODS = ("probabilistic", "center", "random", "weighted")
MODES = ("occupancy", "density", "gaussian")
# how many of each unit make one mm
UNITS = {"mm": 1.0, "um": 1.0e3, "nm": 1.0e6}
_AXES = ("x", "y", "z")
_UNIT_ALIASES = {"mm": "mm", "um": "um", "µm": "um", "μm": "um", "micron": "um", "microns": "um", "nm": "nm"}




# --------------------------------------------------------------------------------------------------------- export
def _check_unit(unit: str, what: str = "unit") -> str:
    if unit not in UNITS:
        raise PointCloudError(f"invalid {what}: expected one of {' | '.join(UNITS)}, got {unit!r}")
    return unit


def voxel_to_world(indices: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """World coordinates (mm) of (fractional) voxel indices.

    Args:
        indices: ``(N, D)`` voxel indices, D = 2 or 3 spatial axes.
        affine: ``(4, 4)`` NIfTI affine (also for 2D, as MONAI keeps it: the third index is 0), ``(D+1, D+1)``,
            or None for the identity (1 mm voxels at the origin).

    Returns:
        ``(N, D)`` float64 coordinates: the first D rows of ``affine @ [i, j, (k,) 1]``.
    """
    idx = np.asarray(indices, dtype=np.float64)
    if idx.ndim != 2 or idx.shape[1] not in (2, 3):
        raise ValueError(f"indices must have shape (N, 2) or (N, 3), got {idx.shape}")
    dims = idx.shape[1]
    a = np.eye(dims + 1) if affine is None else np.asarray(affine, dtype=np.float64)
    if a.shape not in ((4, 4), (dims + 1, dims + 1)):
        raise ValueError(f"affine must be 4x4 or {dims + 1}x{dims + 1} for {dims}D indices, got shape {a.shape}")
    n = a.shape[0] - 1
    return idx @ a[:dims, :dims].T + a[:dims, n]


def sample_points(
    volume: np.ndarray,
    affine: np.ndarray | None,
    num_points: int,
    threshold: float = 0.1,
    method: str = "probabilistic",
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """Draw ``num_points`` points (mm) from a 2D or 3D intensity volume.

    Candidates are the voxels with ``v > threshold`` (NaNs are never candidates). Each point is a candidate index
    drawn with replacement, plus a sub-voxel offset, mapped through ``affine`` (:func:`voxel_to_world`):

    * ``probabilistic``: ``P(voxel) = (v - threshold) / sum(v - threshold)``; offset uniform in ``[-0.5, 0.5)``
      voxel per axis;
    * ``center``: ``P(voxel) = v / sum(v)``; no offset (points on voxel centres, repeated as drawn);
    * ``random``: ``P(voxel) = 1 / number of candidates``; uniform offset;
    * ``weighted``: ``P(voxel) = v / sum(v)``; uniform offset.

    Args:
        volume: ``(X, Y[, Z])`` intensities (a single channel).
        affine: the volume's NIfTI affine, or None for the identity.
        num_points: points to draw (>= 1).
        threshold: intensity a candidate must exceed (>= 0, so that every candidate has a positive weight).
        method: one of :data:`METHODS`.
        seed: seed of the draw (or a numpy ``Generator``); the same seed gives the same points.

    Returns:
        ``(num_points, D)`` float64 coordinates in mm, or ``(0, D)`` when no voxel is above the threshold.
    """
    v = np.asarray(volume)
    if v.ndim not in (2, 3):
        raise ValueError(f"volume must be 2D or 3D (one channel), got shape {v.shape}")
    if int(num_points) != num_points or num_points < 1:
        raise ValueError(f"num_points must be an integer >= 1, got {num_points!r}")
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {' | '.join(METHODS)}, got {method!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    flat = v.ravel()
    # compare in the volume's own precision: a float32 0.1 is not above a threshold of 0.1
    limit = flat.dtype.type(threshold) if np.issubdtype(flat.dtype, np.floating) else threshold
    candidates = np.flatnonzero(flat > limit)  # NaN > limit is False
    if candidates.size == 0:
        return np.zeros((0, v.ndim), dtype=np.float64)
    values = flat[candidates].astype(np.float64)
    if method == "probabilistic":
        weights = values - threshold
    elif method == "random":
        weights = None
    else:
        weights = values
    p = None if weights is None else weights / weights.sum()
    chosen = candidates[rng.choice(candidates.size, size=int(num_points), replace=True, p=p)]
    indices = np.stack(np.unravel_index(chosen, v.shape), axis=1).astype(np.float64)
    if method != "center":
        indices += rng.random(indices.shape) - 0.5
    return voxel_to_world(indices, affine)


def points_header(dims: int, unit: str) -> list[str]:
    """Column names of a point table: ``["x [mm]", "y [mm]", "z [mm]"]`` (2D: x and y)."""
    return [f"{axis} [{_check_unit(unit)}]" for axis in _AXES[:dims]]


def _refuse_existing(path: Path, overwrite: bool, hint: str = "it is not replaced unless asked") -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; {hint}")


def write_points_csv(path: str | Path, points_mm: np.ndarray, unit: str = "mm", overwrite: bool = False) -> Path:
    """Write points (mm) converted to ``unit`` as CSV with a header naming the unit; an empty array gives a file
    with the header only.

    Args:
        path: the .csv file.
        points_mm: ``(N, 2)`` or ``(N, 3)`` coordinates in mm.
        unit: ``mm``, ``um`` or ``nm``.
        overwrite: replace an existing file (otherwise a :class:`FileExistsError`).
    """
    path = Path(path)
    pts = np.asarray(points_mm, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (N, 2) or (N, 3), got {pts.shape}")
    _refuse_existing(path, overwrite)
    header = ",".join(points_header(pts.shape[1], unit))
    np.savetxt(path, pts * UNITS[unit], fmt="%.9g", delimiter=",", header=header, comments="")
    return path


def write_points_ply(path: str | Path, points_mm: np.ndarray, unit: str = "mm", overwrite: bool = False) -> Path:
    """Write points (mm) converted to ``unit`` as a binary little-endian PLY of double ``x y z`` vertices (2D points
    get ``z = 0``); the unit is in a ``comment unit`` line.

    Args:
        path: the .ply file.
        points_mm: ``(N, 2)`` or ``(N, 3)`` coordinates in mm.
        unit: ``mm``, ``um`` or ``nm``.
        overwrite: replace an existing file (otherwise a :class:`FileExistsError`).
    """
    path = Path(path)
    pts = np.asarray(points_mm, dtype=np.float64) * UNITS[_check_unit(unit)]
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (N, 2) or (N, 3), got {pts.shape}")
    if pts.shape[1] == 2:
        pts = np.concatenate([pts, np.zeros((pts.shape[0], 1))], axis=1)
    _refuse_existing(path, overwrite)
    head = (f"ply\nformat binary_little_endian 1.0\ncomment unit {unit}\nelement vertex {pts.shape[0]}\n"
            "property double x\nproperty double y\nproperty double z\nend_header\n")
    with open(path, "wb") as f:
        f.write(head.encode("ascii"))
        f.write(np.ascontiguousarray(pts, dtype="<f8").tobytes())
    return path


def export_sample(
    volume: np.ndarray,
    affine: np.ndarray | None,
    path_stem: str | Path,
    settings: PointCloudSettings,
    seed: int,
    name: str | None = None,
) -> list[Path]:
    """Write one sample's point cloud as ``<stem>.csv`` (and ``<stem>.ply`` when ``settings.ply``).

    With no voxel above the threshold, the CSV (and PLY) hold no points and a warning names the sample, the
    threshold and the sample's maximum.

    Args:
        volume: ``(X, Y[, Z])`` sample intensities.
        affine: the affine the sample's NIfTI is written with (None: identity).
        path_stem: file path without extension.
        settings: ``sampling.pointcloud`` (``num_points``, ``threshold``, ``method``, ``unit``, ``ply``).
        seed: seed of the draw (sampling seed + sample index).
        name: how the warning names the sample (default: the stem's file name).
    """
    stem = Path(path_stem)
    points = sample_points(volume, affine, settings.num_points, settings.threshold, settings.method, seed)
    if points.shape[0] == 0:
        finite = np.asarray(volume)[np.isfinite(volume)]
        top = f"{finite.max():.4g}" if finite.size else "no finite value"
        warnings.warn(
            f"{name or stem.name}: no voxel above sampling.pointcloud.threshold={settings.threshold} (maximum "
            f"{top}); wrote an empty point cloud", stacklevel=2,
        )
    written = [write_points_csv(stem.with_name(stem.name + ".csv"), points, settings.unit)]
    if settings.ply:
        written.append(write_points_ply(stem.with_name(stem.name + ".ply"), points, settings.unit))
    return written


# --------------------------------------------------------------------------------------------------------- import
def _column_axis(name: str) -> tuple[str, str | None] | None:
    """``(axis, unit or None)`` when a header names an x/y/z column (``x``, ``x [nm]``, ``x (um)``, ``x_nm``,
    ``"x [µm]"``), else None."""
    text = name.strip().strip("\"'").strip().lower()
    m = re.fullmatch(r"([xyz])(?:\s*[\[(]\s*([^\])]+?)\s*[\])]|[_ ]([a-zµμ]+))?", text)
    if m is None:
        return None
    unit_text = m.group(2) or m.group(3)
    if unit_text is None:
        return m.group(1), None
    unit = _UNIT_ALIASES.get(unit_text)
    return (m.group(1), unit) if unit is not None else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pick_columns(
    header: list[str] | None, columns: Sequence[str] | None, where: str
) -> tuple[list[int], list[str | None]]:
    """Indices of the x, y, z columns and the unit each header names (None: not named)."""
    if columns is not None:
        if len(columns) != 3:
            raise PointCloudError(f"invalid --columns: expected three names or 0-based indices (x,y,z), "
                                  f"got {list(columns)}")
        picked, units = [], []
        for c in columns:
            c = c.strip()
            if c.isdigit():
                i = int(c)
                if header is not None and i >= len(header):
                    raise PointCloudError(f"{where}: column index {i} is past its {len(header)} columns")
            elif header is None:
                raise PointCloudError(f"{where} has no header row, so --columns must give 0-based indices, got {c!r}")
            else:
                names = [h.strip().strip("\"'").strip() for h in header]
                if c not in names:
                    raise PointCloudError(f"{where} has no column {c!r} (columns: {', '.join(names)})")
                i = names.index(c)
            axis = _column_axis(header[i]) if header is not None else None
            picked.append(i)
            units.append(axis[1] if axis else None)
        return picked, units
    if header is None:
        raise PointCloudError(f"{where} has no header row naming x, y, z columns; name them with --columns "
                              "(0-based indices, e.g. --columns 1,2,3)")
    found: dict[str, tuple[int, str | None]] = {}
    for i, name in enumerate(header):
        axis = _column_axis(name)
        if axis is not None and axis[0] not in found:
            found[axis[0]] = (i, axis[1])
    missing = [a for a in _AXES if a not in found]
    if missing:
        raise PointCloudError(
            f"{where} has no {', '.join(missing)} column (columns: {', '.join(h.strip() for h in header)}); "
            "expected x, y, z headers such as 'x [nm]' or 'x_nm', or name them with --columns"
        )
    return [found[a][0] for a in _AXES], [found[a][1] for a in _AXES]


def _read_rows(path: Path, limit: int | None = None) -> list[list[str]]:
    """The non-empty rows of a CSV or TSV file (the delimiter is the more frequent of tab and comma), at most
    ``limit`` of them."""
    rows: list[list[str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(65536)
            f.seek(0)
            delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
            for r in csv.reader(f, delimiter=delimiter):
                if r and any(c.strip() for c in r):
                    rows.append(r)
                    if limit is not None and len(rows) >= limit:
                        break
    except UnicodeDecodeError:
        raise PointCloudError(f"{path} is not a text table (CSV/TSV); HDF5 files need a .h5 or .hdf5 suffix") from None
    if not rows:
        raise PointCloudError(f"{path} is empty; expected a table of x, y, z coordinates")
    return rows


def _table_columns(rows: list[list[str]], columns: Sequence[str] | None, where: str):
    """``(header or None, column indices, units)`` of a table's x, y, z columns; a first row that is not all
    numbers is the header."""
    header = None if all(_is_number(c) for c in rows[0]) else rows[0]
    picked, units = _pick_columns(header, columns, where)
    return header, picked, units


def read_points_csv(path: str | Path, columns: Sequence[str] | None = None) -> tuple[np.ndarray, list[str | None]]:
    """``(points (N, 3), units)`` from a CSV (or TSV) table; ``units[a]`` is the unit the header names for axis
    ``a`` (None when it names none).

    A first row that is not all numbers is the header. Columns are found by name (``x``, ``x [nm]``, ``x_nm``, ...)
    unless ``columns`` names them (header names, or 0-based indices for a file without header).
    """
    path = Path(path)
    rows = _read_rows(path)
    header, picked, units = _table_columns(rows, columns, str(path))
    body = rows[1:] if header is not None else rows
    try:
        points = np.array([[float(r[i]) for i in picked] for r in body], dtype=np.float64).reshape(-1, 3)
    except (ValueError, IndexError) as exc:
        raise PointCloudError(f"{path}: a row has a missing or non-numeric x, y or z value ({exc})") from None
    return points, units


def _is_hdf5(path: Path) -> bool:
    return path.suffix.lower() in (".h5", ".hdf5", ".hdf")


def _require_h5py(path: Path) -> Any:
    try:
        import h5py
    except ImportError:
        raise PointCloudError(f"{path} is HDF5, which needs h5py: pip install h5py") from None
    return h5py


def _read_points_h5(path: Path, dataset: str | None) -> np.ndarray:
    h5py = _require_h5py(path)

    def usable(obj: Any) -> bool:
        if not isinstance(obj, h5py.Dataset):
            return False
        names = obj.dtype.names
        if names is not None:
            return all(a in names for a in _AXES)
        return obj.ndim == 2 and obj.shape[1] == 3

    with h5py.File(path, "r") as f:
        if dataset is not None:
            if dataset not in f:
                raise PointCloudError(f"{path} has no dataset {dataset!r}")
            if not usable(f[dataset]):
                raise PointCloudError(f"{path}: dataset {dataset!r} has shape {f[dataset].shape} and fields "
                                      f"{f[dataset].dtype.names}; expected (N, 3) or fields x, y, z")
            name = dataset
        else:
            found: list[str] = []
            f.visititems(lambda n, obj: found.append(n) if usable(obj) else None)
            if not found:
                raise PointCloudError(f"{path} has no dataset of shape (N, 3) or with fields x, y, z")
            name = found[0]
        data = f[name][()]
    if data.dtype.names is not None:
        return np.stack([np.asarray(data[a], dtype=np.float64) for a in _AXES], axis=1)
    return np.asarray(data, dtype=np.float64)


def read_points(path: str | Path, unit: str, columns: Sequence[str] | None = None,
                dataset: str | None = None) -> np.ndarray:
    """Points of a CSV/TSV or HDF5 (``.h5``, ``.hdf5``) file, in mm.

    Args:
        path: the file.
        unit: unit of coordinates whose column header names no unit (and of all HDF5 coordinates).
        columns: CSV only: the x, y, z column names or 0-based indices (default: found by name).
        dataset: HDF5 only: the dataset (default: the first of shape ``(N, 3)`` or with fields x, y, z).
    """
    path = Path(path)
    if not path.is_file():
        raise PointCloudError(f"input {path} does not exist or is not a file")
    _check_unit(unit, "--unit")
    if _is_hdf5(path):
        return _read_points_h5(path, dataset) / UNITS[unit]
    points, units = read_points_csv(path, columns)
    scale = np.array([1.0 / UNITS[u or unit] for u in units])
    return points * scale


# points within this fraction of a voxel below a voxel boundary count as on it, so that unit conversions
# (20 nm -> 2e-5 mm) do not move a point that sits exactly on a boundary into the voxel below
_BOUNDARY_TOLERANCE = 1e-9


def _bin(points: np.ndarray, origin: np.ndarray, voxel_size: np.ndarray) -> np.ndarray:
    """Voxel index of each point: ``floor((p - origin) / voxel_size)``, up to :data:`_BOUNDARY_TOLERANCE`."""
    return np.floor((points - origin) / voxel_size + _BOUNDARY_TOLERANCE).astype(np.int64)


def grid_from_extent(
    voxel_size: Sequence[float],
    extent: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    origin: Sequence[float] | None = None,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(origin, shape)`` of a grid, all lengths in one unit.

    Exactly one of: ``extent`` (``x0 x1 y0 y1 z0 z1``: origin ``(x0, y0, z0)``, ``ceil((x1 - x0) / s)`` voxels per
    axis), ``shape`` (with ``origin``, default 0), or neither (the bounding box of ``points``: origin at their
    minimum, enough voxels to hold their maximum).
    """
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.size == 1:
        vs = np.repeat(vs, 3)
    if vs.size != 3 or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise PointCloudError(f"invalid --voxel-size: expected one or three positive numbers, got {list(voxel_size)}")
    if extent is not None and shape is not None:
        raise PointCloudError("invalid grid: give --extent or --shape, not both")
    if extent is not None:
        if origin is not None:
            raise PointCloudError("invalid --origin: it goes with --shape; --extent already sets the origin (x0 y0 z0)")
        e = np.asarray(extent, dtype=np.float64).reshape(-1)
        if e.size != 6 or not np.all(np.isfinite(e)):
            raise PointCloudError(f"invalid --extent: expected six numbers x0 x1 y0 y1 z0 z1, got {list(extent)}")
        lo, hi = e[0::2], e[1::2]
        if np.any(hi <= lo):
            raise PointCloudError(f"invalid --extent: it is empty; each upper bound must exceed its lower bound, got "
                                  f"{list(extent)}")
        n = np.maximum(np.ceil((hi - lo) / vs - 1e-9), 1).astype(int)
        return lo, _checked_shape(n)
    o = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64).reshape(-1)
    if o.size != 3 or not np.all(np.isfinite(o)):
        raise PointCloudError(f"invalid --origin: expected three numbers, got {list(origin)}")
    if shape is not None:
        s = [int(v) for v in shape]
        if len(s) != 3 or min(s) < 1:
            raise PointCloudError(f"invalid --shape: expected three integers >= 1, got {list(shape)}")
        return o, _checked_shape(s)
    if points is not None:
        points = points[np.all(np.isfinite(points), axis=1)]
    if points is None or len(points) == 0:
        raise PointCloudError("no points to take the extent from; give --extent or --shape")
    lo = points.min(axis=0) if origin is None else o
    n = _bin(points, lo, vs).max(axis=0) + 1  # as voxelize() bins them: the last point fits
    if np.any(n < 1):
        raise PointCloudError(f"invalid --origin: {list(o)} lies beyond every point; give --extent or --shape")
    return lo, _checked_shape(n)


# a grid larger than this is almost surely a unit mix-up (8 GiB as float32)
_MAX_VOXELS = 2**31


def _checked_shape(n: Sequence[int]) -> tuple[int, int, int]:
    shape = (int(n[0]), int(n[1]), int(n[2]))
    if math.prod(shape) > _MAX_VOXELS:
        raise PointCloudError(f"the grid would be {list(shape)} voxels ({math.prod(shape):.3g}, more than 2^31); "
                              "check --unit, --voxel-size and --extent")
    return shape


def voxelize(
    points_mm: np.ndarray,
    voxel_size_mm: Sequence[float] | float,
    origin_mm: Sequence[float],
    shape: Sequence[int],
    mode: str = "density",
    sigma: float = 1.0,
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Bin points into a grid.

    Args:
        points_mm: ``(N, 3)`` coordinates in mm.
        voxel_size_mm: one or three voxel sizes in mm.
        origin_mm: the grid's lower corner (voxel ``(0, 0, 0)`` covers ``[origin, origin + voxel_size)``).
        shape: voxels per axis.
        mode: ``occupancy`` (1 where a voxel holds a point, uint8), ``density`` (points per voxel, float32) or
            ``gaussian`` (points per voxel smoothed by a sampled Gaussian kernel of ``sigma`` voxels, truncated at
            4 sigma, zero outside the grid; float32).
        sigma: the Gaussian's standard deviation in voxels (``gaussian`` only, > 0).
        normalize: ``density`` / ``gaussian``: divide by the maximum, so values lie in [0, 1].

    Returns:
        ``(volume, affine, dropped)``: the ``shape`` volume, its 4x4 affine in mm (diagonal voxel sizes, translation
        at the centre of voxel 0), and the number of points outside the grid that were left out.
    """
    if mode not in MODES:
        raise PointCloudError(f"invalid --mode: expected one of {' | '.join(MODES)}, got {mode!r}")
    if mode == "gaussian" and not (np.isfinite(sigma) and sigma > 0):
        raise PointCloudError(f"invalid --sigma: expected a positive number of voxels, got {sigma!r}")
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1), (3,))
    if np.any(vs <= 0):
        raise PointCloudError(f"voxel size must be positive, got {list(vs)}")
    o = np.asarray(origin_mm, dtype=np.float64).reshape(3)
    dims = np.asarray(shape, dtype=int).reshape(3)
    pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    idx = _bin(pts, o, vs)
    inside = np.all((idx >= 0) & (idx < dims), axis=1) & np.all(np.isfinite(pts), axis=1)
    flat = np.ravel_multi_index(tuple(idx[inside].T), tuple(dims))
    counts = np.bincount(flat, minlength=int(np.prod(dims))).reshape(tuple(dims)).astype(np.float32)
    if mode == "occupancy":
        volume = (counts > 0).astype(np.uint8)
    else:
        volume = counts
        if mode == "gaussian":
            volume = _gaussian(counts, float(sigma))
        if normalize and volume.max() > 0:
            volume = volume / volume.max()
    affine = np.eye(4)
    affine[:3, :3] = np.diag(vs)
    affine[:3, 3] = o + 0.5 * vs
    return volume, affine, int(pts.shape[0] - inside.sum())


def _gaussian(counts: np.ndarray, sigma: float) -> np.ndarray:
    """``counts`` smoothed by a sampled Gaussian kernel of ``sigma`` voxels, truncated at 4 sigma, zero outside.

    scipy.ndimage when it is installed (several times faster on large grids), else MONAI's ``GaussianFilter``
    with the same kernel (``approx="sampled"``, ``truncated=4``); the two agree to float32 rounding.
    """
    try:
        from scipy.ndimage import gaussian_filter
    except ImportError:
        import torch
        from monai.networks.layers import GaussianFilter

        with torch.no_grad():
            smooth = GaussianFilter(counts.ndim, sigma, truncated=4.0, approx="sampled")
            return smooth(torch.from_numpy(counts)[None, None])[0, 0].numpy().astype(np.float32)
    return gaussian_filter(counts, sigma, mode="constant", cval=0.0, truncate=4.0).astype(np.float32)


def _output_path(out_dir: Path, source: Path) -> Path:
    name = source.name
    for suffix in (".csv", ".tsv", ".txt", ".h5", ".hdf5", ".hdf"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out_dir / f"{name}.nii.gz"


def voxelize_files(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    voxel_size: Sequence[float],
    unit: str,
    mode: str = "density",
    extent: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    origin: Sequence[float] | None = None,
    sigma: float = 1.0,
    normalize: bool = False,
    columns: Sequence[str] | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = print,
) -> list[Path]:
    """Voxelise each point-cloud file into ``<out_dir>/<name>.nii.gz``; returns the files written.

    Every option is checked, and every output path tested (an existing one is an error unless ``overwrite``),
    before any file is read.

    Args:
        inputs: CSV/TSV or HDF5 files.
        out_dir: output folder (created if needed).
        voxel_size: one or three voxel sizes, in ``unit``.
        unit: ``nm``, ``um`` or ``mm``: the unit of ``voxel_size``, ``extent``, ``origin`` and of coordinates whose
            header names no unit.
        mode, sigma, normalize: as in :func:`voxelize`.
        extent, shape, origin: the grid, as in :func:`grid_from_extent` (in ``unit``); neither extent nor shape:
            each file's own bounding box.
        columns, dataset: as in :func:`read_points`.
        overwrite: replace existing outputs.
        progress: show a progress bar over the files.
        log: where the per-file line (points, grid, points left out) goes.
    """
    import nibabel as nib
    from tqdm.auto import tqdm

    _check_unit(unit, "--unit")
    if mode not in MODES:
        raise PointCloudError(f"invalid --mode: expected one of {' | '.join(MODES)}, got {mode!r}")
    if mode == "gaussian" and not (np.isfinite(sigma) and sigma > 0):
        raise PointCloudError(f"invalid --sigma: expected a positive number of voxels, got {sigma!r}")
    if extent is not None or shape is not None:
        grid_from_extent(voxel_size, extent, shape, origin)  # check the grid options before reading anything
    else:
        grid_from_extent(voxel_size, shape=(1, 1, 1), origin=origin)
    sources = [Path(p) for p in inputs]
    if not sources:
        raise PointCloudError("no input files given")
    for src in sources:
        if not src.is_file():
            raise PointCloudError(f"input {src} does not exist or is not a file")
        if _is_hdf5(src):
            _require_h5py(src)
        else:  # the header (or --columns) names x, y, z: found out before any file is written
            _table_columns(_read_rows(src, limit=1), columns, str(src))
    out = Path(out_dir)
    targets = [_output_path(out, s) for s in sources]
    seen: dict[Path, Path] = {}
    for src, target in zip(sources, targets):
        if target in seen:
            raise PointCloudError(f"{seen[target]} and {src} would both be written to {target}; voxelize them into "
                                  "different --out folders")
        seen[target] = src
        _refuse_existing(target, overwrite, "pass --overwrite to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    def mm(values: Sequence[float] | None) -> np.ndarray | None:
        return None if values is None else np.asarray(values, dtype=np.float64) / UNITS[unit]

    vs = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64).reshape(-1), (3,))
    written = []
    for src, target in tqdm(list(zip(sources, targets)), desc="voxelize", unit="file", disable=not progress):
        points = read_points(src, unit, columns, dataset)
        o, n = grid_from_extent(mm(vs), mm(extent), shape, mm(origin), points)
        volume, affine, dropped = voxelize(points, mm(vs), o, n, mode, sigma, normalize)
        _refuse_existing(target, overwrite, "pass --overwrite to replace it, or choose another --out")
        nib.save(nib.Nifti1Image(volume, affine), str(target))
        log(f"{src}: {points.shape[0]} points -> {target} {list(n)} voxels of {[float(v) for v in vs]} {unit}, {mode}; "
            f"{dropped} point(s) outside the extent left out")
        written.append(target)
    return written
