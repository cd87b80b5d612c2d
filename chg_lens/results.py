"""Saving and loading results without pickle: tensors in safetensors, everything else in JSON.

A result folder holds ``tensors.safetensors`` and ``meta.json``. Every result type (CHG,
contrastive CHG, ablation, patching) is written through :func:`save_bundle` and read through
:func:`load_bundle`, so a reload is exact and needs no code execution. ``meta.json`` names the
result's ``kind``; :func:`load` returns the right class for it, and :func:`cached` fits a result
or loads the one already saved::

    result = chg_lens.results.load("runs/chg")          # a CHGResult (or ContrastiveResult, ...)
    result = cached("runs/fits/ioi", {"updates": 100}, lambda folder: fit_chg(model, train, updates=100))
"""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

TENSORS = "tensors.safetensors"
META = "meta.json"
CACHE_KEY = "cache_key"
"""The key under which :func:`cached` stores a result's settings in its ``meta``."""

KINDS: dict[str, str] = {
    "chg": "chg_lens.chg:CHGResult",
    "contrastive": "chg_lens.contrastive:ContrastiveResult",
    "ablation": "chg_lens.ablation:AblationResult",
    "patching": "chg_lens.patching:PatchResult",
}
"""``kind`` in meta.json -> the result class (``module:Class``, imported when loaded)."""


def save_bundle(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to the folder ``path`` (created if needed).

    Files are written to temporary names and renamed, so an interrupted save never leaves a
    half-written result behind.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    tmp_t, tmp_m = path / (TENSORS + ".tmp"), path / (META + ".tmp")
    save_file(clean, str(tmp_t))
    tmp_m.write_text(json.dumps(_jsonable(meta), indent=2, sort_keys=True, allow_nan=True))
    os.replace(tmp_t, path / TENSORS)
    os.replace(tmp_m, path / META)
    return path


def load_bundle(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = Path(path)
    if not (path / TENSORS).exists() or not (path / META).exists():
        raise FileNotFoundError(f"{path} is not a chg_lens result folder (needs {TENSORS} and {META})")
    return load_file(str(path / TENSORS)), json.loads((path / META).read_text())


class Result:
    """The protocol every saved result follows (CHG, contrastive, ablation, patching).

    A result class declares its ``kind`` (written to ``meta.json``; :func:`load` finds the class by
    it) and ``noun`` (for errors), and implements ``save(path)``, ``load(path)`` (a classmethod that
    reads the bundle through :meth:`read`, which checks the kind), ``to_frame()`` (its main table)
    and ``tensor(column)`` (a column of that table as ``[n_layers, n_heads]``, for tables with one
    row per head). ``frame`` is not the method's name because ablation and patching results already
    hold their table in a ``frame`` field.
    """

    kind: str = ""
    noun: str = "result"
    meta: dict[str, Any]

    def to_frame(self):
        raise NotImplementedError

    def tensor(self, column: str) -> Tensor:
        return head_tensor(self.to_frame(), column, int(self.meta["n_layers"]), int(self.meta["n_heads"]))

    def save(self, path: str | os.PathLike) -> Path:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | os.PathLike):
        raise NotImplementedError

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """:func:`load_bundle`, and a ``ValueError`` unless the folder holds a result of ``cls.kind``."""
        tensors, meta = load_bundle(path)
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{path} holds a '{meta.get('kind')}' result, not {cls.noun}")
        return tensors, meta


class FrameResult(Result):
    """A result whose data is one table (``frame``), ``baseline`` metrics and ``meta`` (ablation,
    patching): saved as ``meta.json`` (the table as JSON, exact), ``frame.parquet``, ``frame.csv``
    and the tensors of :meth:`tensors_to_save`."""

    frame: Any
    baseline: dict[str, float]

    def to_frame(self):
        return self.frame

    def tensors_to_save(self) -> dict[str, Tensor]:
        return {}

    def save(self, path: str | os.PathLike) -> Path:
        """Folder with ``frame.parquet``, ``frame.csv``, ``meta.json`` (+ tensors.safetensors)."""
        path = save_bundle(path, self.tensors_to_save(), {"kind": self.kind, "frame": frame_to_json(self.frame),
                                                          "baseline": self.baseline, "meta": self.meta})
        self.frame.to_parquet(path / "frame.parquet", index=False)
        self.frame.to_csv(path / "frame.csv", index=False)
        return path


def head_tensor(frame, column: str, n_layers: int, n_heads: int) -> Tensor:
    """``frame[column]`` (one row per ``layer``, ``head``) as an ``[n_layers, n_heads]`` float32
    tensor, NaN where a head has no row."""
    out = torch.full((n_layers, n_heads), float("nan"))
    out[torch.tensor(frame["layer"].to_numpy(dtype="int64")), torch.tensor(frame["head"].to_numpy(dtype="int64"))] = \
        torch.tensor(frame[column].to_numpy(dtype="float64"), dtype=torch.float32)
    return out


def read_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` in ``path/meta.json`` (None if the folder holds no chg_lens result)."""
    meta = Path(path) / META
    if not meta.is_file() or not (Path(path) / TENSORS).is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def result_class(kind: str):
    """The class that saves results of ``kind`` (see :data:`KINDS`)."""
    import importlib

    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}; known kinds: {', '.join(KINDS)}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load(path: str | os.PathLike):
    """The result saved in the folder ``path``, as the class its ``meta.json`` kind names::

        result = chg_lens.load("runs/chg")      # CHGResult, ContrastiveResult, AblationResult or PatchResult
    """
    _, meta = load_bundle(path)
    return result_class(meta.get("kind")).load(path)


def cached(folder: str | os.PathLike, key: dict[str, Any] | None, fn: Callable[[Path], Any]):
    """Fit or load: the result saved in ``folder`` if there is one, else ``fn(folder)`` saved there.

    ``key`` (JSON-able settings) is stored in the result's ``meta``; a saved result whose stored
    key differs is a ``ValueError`` naming the settings that differ, so a folder never silently
    serves a fit made with other settings. ``fn`` may keep a checkpoint under ``folder`` (e.g.
    ``folder / "checkpoint"``) so an interrupted fit resumes::

        result = cached(out / "fits" / "ioi", {"updates": 100, "lam": 0.1},
                        lambda folder: fit_chg(model, train, updates=100, checkpoint_dir=folder / "checkpoint"))
    """
    folder = Path(folder)
    want = None if key is None else json.loads(json.dumps(_jsonable(key), sort_keys=True))
    if (folder / META).exists():
        result = load(folder)
        stored = result.meta.get(CACHE_KEY)
        if want is not None and stored is not None:
            differs = [k for k in {**stored, **want} if stored.get(k) != want.get(k)]
            if differs:
                raise ValueError(f"{folder} holds a fit with other settings ({', '.join(differs)}); "
                                 "use another output folder, or delete that one to refit")
        return result
    folder.mkdir(parents=True, exist_ok=True)
    result = fn(folder)
    if want is not None:
        result.meta[CACHE_KEY] = want
    result.save(folder)
    return result


def frame_to_json(frame) -> dict[str, Any]:
    """A small DataFrame as JSON-able ``{"columns", "data"}`` (column order kept)."""
    split = frame.to_dict(orient="split")
    return {"columns": split["columns"], "data": split["data"]}


def frame_from_json(obj: dict[str, Any]):
    import pandas as pd

    return pd.DataFrame(obj["data"], columns=obj["columns"])


def pack_stages(
    logits: dict[str, Tensor],
    traces: dict[str, dict[str, Tensor]],
    snapshots: dict[str, Tensor],
    snapshot_steps: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Flat safetensors keys for a fitted result's per-stage tensors (``logits/<stage>``,
    ``trace/<stage>/<name>``, ``snapshots/<stage>``, ``snapshot_steps/<stage>``); see :func:`unpack_stages`."""
    tensors = {f"logits/{k}": v for k, v in logits.items()}
    for stage, named in traces.items():
        tensors.update({f"trace/{stage}/{k}": v for k, v in named.items()})
    tensors.update({f"snapshots/{k}": v for k, v in snapshots.items()})
    tensors.update({f"snapshot_steps/{k}": v for k, v in snapshot_steps.items()})
    return tensors


def unpack_stages(tensors: dict[str, Tensor]) -> tuple[dict, dict, dict, dict]:
    """Inverse of :func:`pack_stages`: ``(logits, traces, snapshots, snapshot_steps)``."""
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    traces: dict[str, dict[str, Tensor]] = {}
    for k, v in pick("trace/").items():
        stage, name = k.split("/", 1)
        traces.setdefault(stage, {})[name] = v
    return pick("logits/"), traces, pick("snapshots/"), pick("snapshot_steps/")


def traces_frame(traces: dict[str, dict[str, Tensor]]):
    """Per-update traces ``{stage: {name: [updates, configs]}}`` as a long frame:
    stage, update, seed, name, value."""
    import pandas as pd

    rows = []
    for stage, named in traces.items():
        for name, t in named.items():
            u, s = t.shape
            rows.append(pd.DataFrame({
                "stage": stage, "update": torch.arange(u).repeat_interleave(s).numpy(),
                "seed": torch.arange(s).repeat(u).numpy(), "name": name, "value": t.flatten().double().numpy(),
            }))
    return pd.concat(rows, ignore_index=True)


def snapshots_frame(snapshots: dict[str, Tensor], snapshot_steps: dict[str, Tensor],
                    offsets: dict[str, int] | None = None):
    """Gate snapshots ``{stage: [snaps, seeds, layer, head]}`` as a long frame (stage, update, seed,
    layer, head, gate); ``offsets`` shifts a stage's update numbers."""
    import pandas as pd

    frames = []
    for stage, snaps in snapshots.items():
        steps = snapshot_steps[stage]
        n, s, L, H = snaps.shape
        idx = torch.cartesian_prod(torch.arange(n), torch.arange(s), torch.arange(L), torch.arange(H))
        frames.append(pd.DataFrame({
            "stage": stage, "update": (steps[idx[:, 0]] + (offsets or {}).get(stage, 0)).numpy(),
            "seed": idx[:, 1].numpy(), "layer": idx[:, 2].numpy(), "head": idx[:, 3].numpy(),
            "gate": snaps.flatten().double().numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("chg_lens", "torch", "transformer-lens", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return obj
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in JSON metadata")
