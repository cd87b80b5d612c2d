"""Saving and loading results without pickle: tensors in safetensors, everything else in JSON.

A result folder holds ``tensors.safetensors`` and ``meta.json``. Every result type (CHG,
contrastive CHG, sweeps) is written through :func:`save_bundle` and read through
:func:`load_bundle`, so a reload is exact and needs no code execution.
"""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

TENSORS = "tensors.safetensors"
META = "meta.json"


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


def frame_to_json(frame) -> dict[str, Any]:
    """A small DataFrame as JSON-able ``{"columns", "data"}`` (column order kept)."""
    split = frame.to_dict(orient="split")
    return {"columns": split["columns"], "data": split["data"]}


def frame_from_json(obj: dict[str, Any]):
    import pandas as pd

    return pd.DataFrame(obj["data"], columns=obj["columns"])


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
