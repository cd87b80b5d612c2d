"""Saving and loading results without pickle: tensors in safetensors, everything else in JSON.

A result folder holds ``tensors.safetensors`` and ``meta.json``. Every result type (CHG,
contrastive CHG, ablation, patching, explain) is written through :func:`save_bundle` and read
through :func:`load_bundle`, so a reload is exact and needs no code execution. ``meta.json`` names
the result's ``kind``; :func:`load` returns the right class for it, and :func:`cached` fits a
result or loads the one already saved. A save is atomic as a whole (a new hidden folder, then one
rename or an atomic exchange, by :mod:`chg_lens.store`), locked against a second writer, and
records the sha256 of every file in ``meta.json`` and of ``meta.json``'s own content; a load checks
both, and checks what it read (kind, config, tensor shapes, finite gate logits) before it builds
the result. :func:`check_target` refuses a folder that holds another kind of result or a different
fit before any work starts::

    result = chg_lens.results.load("runs/chg")          # a CHGResult (or ContrastiveResult, ...)
    result = cached("runs/fits/ioi", {"updates": 100}, lambda folder: fit_chg(model, train, updates=100),
                    kind="chg")
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from . import checks, store

TENSORS = "tensors.safetensors"
META = "meta.json"
CACHE_KEY = "cache_key"
"""The key under which :func:`cached` stores a result's settings in its ``meta``."""

KINDS: dict[str, str] = {
    "chg": "chg_lens.chg:CHGResult",
    "contrastive": "chg_lens.contrastive:ContrastiveResult",
    "ablation": "chg_lens.ablation:AblationResult",
    "patching": "chg_lens.patching:PatchResult",
    "attribution": "chg_lens.attribution:AttributionResult",
    "faithfulness": "chg_lens.faithfulness:FaithfulnessResult",
    "explain": "chg_lens.explain.pipeline:ExplainResult",
    "comparison": "chg_lens.compare:ComparisonResult",
}
"""``kind`` in meta.json -> the result class (``module:Class``, imported when loaded)."""


FORMAT = 3
"""meta.json format: 2 adds ``digests`` (sha256 of every file of the bundle) and ``identity``; 3 adds
``meta_digest`` (sha256 of meta.json's own content, so a hand edit of meta.json is detected)."""
META_DIGEST = "meta_digest"
"""The field of meta.json that holds the sha256 of the rest of it (see :func:`meta_digest`)."""
MAX_HEADS = 10**6
"""More heads (layers x heads) than any model has: a loaded result claiming more is damaged."""
KNOWN_FILES = ("scores.csv", "gates.csv", "frame.csv", "frame.parquet", "validation.csv", "evaluation.csv", "overlap.csv",
               "summary.txt", "head_rankings.csv", "report.html", "report_summary.txt", "comparison.csv",
               "comparison.json", "agreement.csv", "faithfulness.html")
"""Files that chg_lens writes beside a result; replacing a result never carries them over."""

FileWriter = Callable[[Path], Any]
"""Writes one file beside the tensors: called with the file's path inside the new bundle folder."""


# ----------------------------------------------------------------------------- writing
folder_lock = store.folder_lock
"""The lock of a result folder (:func:`chg_lens.store.folder_lock`; kept here under its old name)."""
write_text_atomic = store.write_text
"""One text file by a temporary name and one rename (:func:`chg_lens.store.write_text`; its old name)."""
require_regular_file = store.require_regular_file
_sha256 = store.sha256_file


def write_bundle_files(folder: Path, tensors: Mapping[str, Tensor], meta: dict[str, Any],
                       files: Mapping[str, FileWriter] | None = None) -> dict[str, Any]:
    """Write ``tensors``, the extra ``files`` and, last, ``meta.json`` (with the sha256 of every
    other file under ``digests``) into the existing folder ``folder``; returns the stored meta."""
    clean = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    save_file(clean, str(folder / TENSORS))
    digests = {TENSORS: store.sha256_file(folder / TENSORS)}
    for name, write in (files or {}).items():
        write(folder / name)
        digests[name] = store.sha256_file(folder / name)
    stored = {**_jsonable(meta), "format": FORMAT, "digests": digests, "files": sorted(digests)}
    stored.pop(META_DIGEST, None)
    stored[META_DIGEST] = meta_digest(stored)
    text = json.dumps(stored, indent=2, sort_keys=True, allow_nan=True)
    with open(folder / META, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return stored


def meta_digest(meta: Mapping[str, Any]) -> str:
    """The sha256 of ``meta`` without its ``meta_digest`` field, as canonical JSON (sorted keys, no
    spaces): what :func:`write_bundle_files` stores and :func:`load_bundle` checks."""
    return store.json_digest({k: v for k, v in meta.items() if k != META_DIGEST})


def save_bundle(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any], *,
                files: Mapping[str, FileWriter] | None = None, identity: dict[str, Any] | None = None,
                overwrite: bool = False, own: Iterable[str] = ()) -> Path:
    """Write ``tensors``, JSON-able ``meta`` and the extra ``files`` as the result folder ``path``,
    atomically as a whole.

    The bundle is written into a new hidden folder beside ``path``, which then takes ``path``'s
    place in one rename (an atomic exchange when ``path`` exists: :func:`chg_lens.store.replace_folder`),
    so a kill at any point leaves either the old result or the new one, never a mix. ``path`` may
    be a symbolic link to a folder: the result is written into that folder and the link is kept.
    ``meta.json`` stores the sha256 of every file and of its own content, checked by
    :func:`load_bundle`. Entries of an existing folder that the new bundle does not replace (a
    ``checkpoint/``, your own notes) are kept. A second process writing the same folder at once gets
    a ValueError. ``meta["kind"]`` and ``identity`` (what makes two results the same fit) are checked
    against a result already there by :func:`check_target`; ``overwrite`` replaces a different one.
    ``own`` names working files a result of this kind keeps beside it (the explain pipeline's step
    files), which do not count as another's files.

    Example::

        save_bundle("runs/x", {"gates": g}, {"kind": "chg"}, files={"scores.csv": lambda p: frame.to_csv(p)})
    """
    path = Path(path).expanduser().absolute()
    kind = meta.get("kind")
    own = tuple(own)
    check_target(path, kind, identity, overwrite, own=own)

    def fill(tmp: Path) -> None:
        write_bundle_files(tmp, tensors, {**meta, "identity": identity}, files)

    def drop(old: Path) -> set[str]:
        """What the new bundle replaces: meta.json, the files chg_lens writes beside a result, and
        (unless ``overwrite``) the files the old bundle listed."""
        listed = set(read_meta(old).get("files", [])) if (old / META).exists() and not overwrite else set()
        return {META, *KNOWN_FILES, *listed}

    return store.replace_folder(path, fill, drop=drop, what="result",
                                check=lambda: check_target(path, kind, identity, overwrite, own=own),
                                complete=lambda tmp: (tmp / META).exists())


PARTS = "parts"
"""The ``meta.json`` field of a result with parts: sub-folder name -> sha256 of that part's ``meta.json``."""


def save_with_parts(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any],
                    parts: Mapping[str, "Result"], *, files: Mapping[str, FileWriter] | None = None,
                    identity: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a result that holds other results: each of ``parts`` into its sub-folder ``path/<name>``
    (each one atomically, by its own :meth:`Result.save`), then this result's own bundle (atomically,
    :func:`save_bundle`), whose ``meta.json`` is written last and records the sha256 of every part's
    ``meta.json`` under ``parts`` (checked by :func:`load_parts`). A save killed half way leaves the
    old result or parts that the old ``meta.json`` does not match: :func:`load_parts` then says so.

    ``path`` is checked once, before any part is written (:func:`check_target` with ``kind``,
    ``identity`` and ``overwrite``); the parts of a result that may be replaced are replaced. Parts
    of the previous result that the new one does not have are removed. A second writer of the same
    folder gets a ValueError at once.

    Example::

        save_with_parts("runs/cmp", {}, {"kind": "comparison"}, {"chg": chg_result, "patching": patch_result})
    """
    path = Path(path).expanduser().absolute()
    bad = [n for n in parts if not n or n != Path(n).name or n.startswith(".") or n in (TENSORS, META)]
    if bad:
        raise ValueError(f"part names must be plain sub-folder names; got {bad}")
    check_target(path, meta.get("kind"), identity, overwrite)
    with folder_lock(path.parent / f"{path.name}.parts", "parts of the result"):
        old_parts: set[str] = set()
        if (path / META).exists():
            with contextlib.suppress(ValueError, OSError):
                old_parts = set((read_meta(path).get(PARTS) or {}))
        digests = {}
        for name, part in parts.items():
            part.save(path / name, overwrite=True)  # the whole result may be replaced: so may its parts
            digests[name] = _sha256(path / name / META)
        stored = save_bundle(path, tensors, {**meta, PARTS: digests}, files=files, identity=identity, overwrite=True)
        for name in sorted(old_parts - set(parts)):
            if (path / name / META).exists():
                shutil.rmtree(path / name, ignore_errors=True)
    return stored


def load_parts(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, "Result"]:
    """The parts of a result written by :func:`save_with_parts` (name -> result, by each part's kind),
    each checked against the sha256 its parent's ``meta.json`` recorded: a part that is missing, was
    changed, or belongs to another save is a ValueError naming it."""
    path = Path(path)
    out = {}
    for name, want in (meta.get(PARTS) or {}).items():
        part = path / name
        if not (part / META).is_file():
            raise ValueError(f"{path} is not complete: its part {name!r} ({part}) is missing; write the result again")
        if _sha256(part / META) != want:
            raise ValueError(f"{part} does not match the digest in {path / META}: the part was changed or belongs to "
                             "another save (was a save interrupted?); write the result again")
        out[name] = load(part)
    return out


def check_target(path: str | os.PathLike, kind: str | None, identity: dict[str, Any] | None = None,
                 overwrite: bool = False, what: str = "the output folder", own: Iterable[str] = ()) -> None:
    """Raise before any work if a ``kind`` result with ``identity`` may not be written to ``path``:
    a file or a path inside a file, an unwritable place, the current folder, a folder that holds
    another kind of result or a different fit (unless ``overwrite``), or a non-empty folder that
    holds no result (unless ``overwrite``). Keys of ``identity`` missing on either side are not
    compared, so a partial identity (the options, before the data are built) can be checked early."""
    p = checks.output_dir(path, what)
    if not p.exists():
        return
    here = Path.cwd().resolve()
    if p.resolve() == here or p.resolve() in here.parents:
        raise ValueError(f"{what} {p} is the current folder or one above it; write the result to a sub-folder")
    if (p / META).exists():
        if overwrite:
            return
        try:
            old = read_meta(p)
        except ValueError as err:
            raise ValueError(f"{what} {p} holds a damaged result ({err}); pass another folder, or overwrite "
                             "(--overwrite / overwrite=True) to replace it") from None
        old_kind = old.get("kind")
        if old_kind != kind:
            raise ValueError(f"{what} {p} already holds a {old_kind!r} result ({describe(old)}); writing a {kind!r} "
                             "result there would replace it: pass another folder, or --overwrite (overwrite=True) "
                             "to replace it")
        diff = identity_differences(old.get("identity"), identity)
        if diff:
            raise ValueError(f"{what} {p} already holds a different {kind} result ({describe(old)}; differs in "
                             f"{', '.join(diff)}): pass another folder, or --overwrite (overwrite=True) to replace it")
        return
    own = {"checkpoint", *own}
    others = sorted(e.name for e in p.iterdir() if e.name not in own and not e.name.startswith("."))
    if others and not overwrite:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise ValueError(f"{what} {p} is a folder with other files ({shown}) and no chg_lens result; pass a new "
                         "or empty folder, or --overwrite (overwrite=True) to add the result to it")


def identity_differences(old: dict | None, new: dict | None, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two identities; keys missing on one side are skipped."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    out = []
    new = json.loads(json.dumps(_jsonable(new), sort_keys=True, allow_nan=True))
    for k in sorted(set(old) & set(new)):
        a, b = old[k], new[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            out.append(f"{prefix}{k} ({a!r} there, {b!r} now)")
    return out


def describe(meta: dict[str, Any]) -> str:
    """A few words about a stored result: its kind, model and task when known."""
    inner = meta.get("meta") if isinstance(meta.get("meta"), dict) else {}
    bits = [f"{k} {inner[k]}" for k in ("model", "task", "mode", "preset") if inner.get(k) is not None]
    return ", ".join(bits) or "no details"


# ----------------------------------------------------------------------------- reading
def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a result folder as a dict; a ValueError naming the file when it is cut
    off, not UTF-8 or not a JSON object."""
    file = Path(path) / META
    try:
        require_regular_file(file)
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a chg_lens result folder (no {META})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}): the result is damaged; "
                         "restore it or write it again") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): the "
                         "result is damaged or was cut off; restore it or write it again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds {type(meta).__name__}, not a JSON object: not a chg_lens result")
    return meta


def load_bundle(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of a result folder written by :func:`save_bundle`.

    With ``verify`` (default), the tensors file must match the sha256 stored in ``meta.json`` and
    ``meta.json`` its own ``meta_digest``; a changed, damaged or mismatched file is a ValueError
    naming it (results written before digests existed load unchecked). Both files must be regular
    files (a named pipe in their place is refused, never read)."""
    path = Path(path)
    if not path.is_dir():
        stale = [p for p in store.leftovers(path.absolute()) if ".old-" in p.name and (p / META).exists()]
        if stale:
            raise FileNotFoundError(f"{path} does not exist: a save was interrupted while replacing it; the previous "
                                    f"result is at {stale[0]} (rename it back to {path.name})")
    if not (path / TENSORS).exists() or not (path / META).exists():
        raise FileNotFoundError(f"{path} is not a chg_lens result folder (needs {TENSORS} and {META})")
    meta = read_meta(path)
    if verify and META_DIGEST in meta and meta[META_DIGEST] != meta_digest(meta):
        raise ValueError(f"{path / META} was changed after it was written (its content does not match its "
                         f"{META_DIGEST}): restore it or write the result again")
    require_regular_file(path / TENSORS)
    raw = (path / TENSORS).read_bytes()
    want = (meta.get("digests") or {}).get(TENSORS) if isinstance(meta.get("digests"), dict) else None
    if verify and want is not None and hashlib.sha256(raw).hexdigest() != want:
        raise ValueError(f"{path / TENSORS} does not match the digest in its {META}: the file was changed or "
                         "damaged after it was written, or belongs to another save; restore it or write it again")
    try:
        tensors = load_safetensors_bytes(raw)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path / TENSORS} cannot be read ({type(err).__name__}: {err}): the file is damaged or "
                         "cut off; restore it or write it again") from None
    return tensors, meta


def require(tensors: Mapping[str, Tensor], names: list[str], path: str | os.PathLike, what: str) -> None:
    """Raise a ValueError naming the first missing tensor of a loaded result."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path} is not a complete {what}: tensor(s) {', '.join(missing[:4])} are missing from "
                         f"{TENSORS}; write the result again")


def require_fields(meta: Mapping[str, Any], names: Sequence[str], path: str | os.PathLike, what: str) -> None:
    """Raise a ValueError naming the first field of ``meta.json`` a loaded result lacks."""
    missing = [n for n in names if n not in meta]
    if missing:
        raise ValueError(f"{Path(path) / META} lacks {', '.join(map(repr, missing))} ({what} needs them): the "
                         "folder is damaged or holds another kind of result; write the result again")


def _damaged(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; the folder is damaged or mixed from two results: write it again")


def loaded_shape(meta: Mapping[str, Any], path: str | os.PathLike) -> tuple[int, int] | None:
    """``(n_layers, n_heads)`` of a loaded result's inner ``meta``, checked (positive whole numbers,
    at most :data:`MAX_HEADS` heads in all); None when the result does not record them."""
    if "n_layers" not in meta and "n_heads" not in meta:
        return None
    try:
        L = checks.positive_int("n_layers", meta.get("n_layers"))
        H = checks.positive_int("n_heads", meta.get("n_heads"))
    except ValueError as err:
        raise _damaged(path, f"meta.json's {err}") from None
    if L * H > MAX_HEADS:
        raise _damaged(path, f"meta.json claims {L} layers x {H} heads, more than any model has")
    return L, H


def check_tensor(tensors: Mapping[str, Tensor], name: str, shape: Sequence[int | None], path: str | os.PathLike,
                 *, finite: bool = False, unit: bool = False) -> None:
    """The loaded tensor ``name`` must have ``len(shape)`` dimensions, each equal to the entry of
    ``shape`` (None: any size); with ``finite`` it must hold finite numbers, with ``unit`` numbers
    in [0, 1]. A ValueError naming the tensor otherwise."""
    t = tensors[name]
    got = tuple(t.shape)
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise _damaged(path, f"tensor {name} is shaped {list(got)}, not [{want}] as the result's meta.json says")
    if (finite or unit) and t.numel():
        if not (t.is_floating_point() and bool(torch.isfinite(t).all())):
            raise _damaged(path, f"tensor {name} holds non-finite values (inf or NaN)" if t.is_floating_point()
                           else f"tensor {name} has dtype {t.dtype}, not a float dtype")
        if unit and (float(t.min()) < 0 or float(t.max()) > 1):
            raise _damaged(path, f"tensor {name} holds values outside [0, 1]")


def check_frame_heads(frame, shape: tuple[int, int] | None, path: str | os.PathLike) -> None:
    """The ``layer`` / ``head`` columns of a loaded table must be whole numbers inside ``shape``."""
    for col, n in zip(("layer", "head"), shape or (None, None)):
        if col not in frame.columns or not len(frame):
            continue
        values = frame[col]
        try:
            whole = bool((values.astype("float64") % 1 == 0).all())
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise _damaged(path, f"the table's {col!r} column holds values that are not whole numbers")
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or (n is not None and hi >= n):
            raise _damaged(path, f"the table's {col!r} column runs from {lo} to {hi}, outside 0..{n - 1 if n else ''} "
                           f"of the model's {n} {col}s")


def check_fit_tensors(tensors: Mapping[str, Tensor], stages: Sequence[str], meta: Mapping[str, Any],
                      path: str | os.PathLike) -> None:
    """The per-stage tensors of a loaded fit (see :func:`pack_stages`) agree with its meta.json: gate
    logits ``[n_seeds, n_layers, n_heads]`` of finite numbers, snapshots ``[snaps, n_seeds, n_layers,
    n_heads]`` in [0, 1] with one step each, traces ``[updates, n_seeds]``; ``n_seeds`` from the
    config, the shape from the inner meta (when recorded)."""
    if not isinstance(meta.get("meta"), dict):
        raise _damaged(path, "meta.json's 'meta' must be a JSON object")
    L, H = loaded_shape(meta["meta"], path) or (None, None)
    S = meta["config"].get("n_seeds")
    for stage in stages:
        check_tensor(tensors, f"logits/{stage}", (S, L, H), path, finite=True)
        S, L, H = tensors[f"logits/{stage}"].shape  # a result of an older release without n_seeds/n_layers
        check_tensor(tensors, f"snapshots/{stage}", (None, S, L, H), path, unit=True)
        check_tensor(tensors, f"snapshot_steps/{stage}", (tensors[f"snapshots/{stage}"].shape[0],), path)
        for name in [k for k in tensors if k.startswith(f"trace/{stage}/")]:
            check_tensor(tensors, name, (None, S), path)


def check_config(config: Any, config_class, path: str | os.PathLike) -> None:
    """A loaded ``config`` must be a JSON object whose known options pass ``config_class.check()``
    (e.g. :class:`~chg_lens.chg.CHGConfig`); unknown keys of other releases are ignored."""
    import dataclasses

    if not isinstance(config, dict):
        raise _damaged(path, f"meta.json's config is {type(config).__name__}, not an object")
    names = {f.name for f in dataclasses.fields(config_class)}
    try:
        config_class(**{k: v for k, v in config.items() if k in names}).check()
    except (ValueError, TypeError) as err:
        raise _damaged(path, f"meta.json's config: {err}") from None


Bundle = tuple[dict[str, Tensor], dict[str, Any], dict[str, FileWriter]]
"""What a result class's ``_bundle()`` hands to :meth:`Result.save`: ``(tensors, fields, files)``."""


class Result(abc.ABC):
    """The protocol every saved result follows (CHG, contrastive, ablation, patching).

    A result class declares its ``kind`` (written to ``meta.json``; :func:`load` finds the class by
    it) and ``noun`` (for errors), and implements ``to_frame()`` (its main table), ``tensor(column)``
    (a column of that table as ``[n_layers, n_heads]``, for tables with one row per head) and two
    hooks for the one :meth:`save` and the one :meth:`load`:

    - ``_bundle() -> (tensors, fields, files)``: the tensors to store in ``tensors.safetensors``, the
      JSON-able fields of ``meta.json`` beside ``kind`` (e.g. ``config``, ``meta``) and the extra
      files (name -> writer, e.g. ``scores.csv``);
    - ``_from_bundle(tensors, meta, path)`` (a classmethod): the result from what :meth:`load` read
      (verified against the digests, kind checked); ``path`` is for error messages.

    ``frame`` is not the table method's name because ablation and patching results already hold
    their table in a ``frame`` field.

    Example::

        result.save("runs/x")               # any result class
        same = type(result).load("runs/x")  # or chg_lens.load("runs/x"), by meta.json's kind
    """

    kind: str = ""
    noun: str = "result"
    meta: dict[str, Any]
    OWN_FILES: tuple[str, ...] = ()
    """Working files a result of this kind keeps in its folder besides the bundle (e.g. the explain
    pipeline's step files): carried over by a save, and not "other files" to :func:`check_target`."""

    @abc.abstractmethod
    def to_frame(self):
        """Implemented by each result class."""

    def tensor(self, column: str) -> Tensor:
        return head_tensor(self.to_frame(), column, int(self.meta["n_layers"]), int(self.meta["n_heads"]))

    def identity(self) -> dict[str, Any] | None:
        """What makes two results of this kind the same fit or analysis (compared before a save
        replaces one; see :func:`check_target`); None compares the kind only."""
        return None

    def _repr_html_(self) -> str:
        """What a notebook (Jupyter, Colab) shows for a bare ``result`` in a cell: the summary, a
        green "converged" / red "NOT converged" banner for fits, and a compact table (the role map,
        the gates switched off, or the top heads by effect), every text escaped
        (:func:`chg_lens.display.notebook_html`)."""
        from .display import notebook_html

        return notebook_html(self)

    @abc.abstractmethod
    def _bundle(self) -> Bundle:
        """``(tensors, meta.json fields besides kind, extra files)``; implemented by each result class."""

    @classmethod
    @abc.abstractmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike):
        """The result from a loaded bundle; implemented by each result class."""

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the result to the folder ``path``: ``tensors.safetensors``, ``meta.json`` (its kind,
        fields, identity and the sha256 of every file) and the class's extra files, atomically as a
        whole (see :func:`save_bundle`). A folder holding another kind of result or a different one
        of this kind is refused unless ``overwrite``.

        Example: ``result.save("runs/ioi")``.
        """
        tensors, fields, files = self._bundle()
        parts = self._parts()
        if parts:
            return save_with_parts(path, tensors, {"kind": self.kind, **fields}, parts, files=files,
                                   identity=self.identity(), overwrite=overwrite)
        return save_bundle(path, tensors, {"kind": self.kind, **fields}, files=files, identity=self.identity(),
                           overwrite=overwrite, own=self.OWN_FILES)

    def _parts(self) -> dict[str, "Result"]:
        """Results saved in sub-folders of this one (sub-folder name -> result), e.g. each method of a
        comparison; ``{}`` (the default) for a result that is one bundle. :meth:`save` writes them
        with :func:`save_with_parts`; ``_from_bundle`` reads them back with :func:`load_parts`."""
        return {}

    @classmethod
    def load(cls, path: str | os.PathLike):
        """The result saved at ``path``, verified against the digests in its ``meta.json``; a
        ``ValueError`` when the folder holds another kind of result or misses a part of this one.

        Example: ``CHGResult.load("runs/ioi")``.
        """
        tensors, meta = cls.read(path)
        return cls._from_bundle(tensors, meta, path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """:func:`load_bundle`, and a ``ValueError`` unless the folder holds a result of ``cls.kind``."""
        tensors, meta = load_bundle(path)
        kind = kind_of(meta, path)
        if kind != cls.kind:
            raise ValueError(f"{path} holds a '{kind}' result, not {cls.noun}")
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

    IDENTITY = ("mode", "method", "order", "seed", "preset", "corruption", "metric", "kind", "data_fingerprint",
                "model")

    def identity(self) -> dict[str, Any]:
        return {k: self.meta.get(k) for k in self.IDENTITY if k in self.meta}

    def _bundle(self) -> Bundle:
        frame = self.frame
        return (self.tensors_to_save(), {"frame": frame_to_json(frame), "baseline": self.baseline, "meta": self.meta},
                {"frame.parquet": lambda p: frame.to_parquet(p, index=False),
                 "frame.csv": lambda p: frame.to_csv(p, index=False)})

    @classmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike):
        frame, baseline, inner = cls._checked_fields(tensors, meta, path)
        return cls(frame=frame, baseline=baseline, meta=inner)

    @classmethod
    def _checked_fields(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike):
        """``(frame, baseline, meta)`` of a loaded bundle, checked: the fields are there, the table's
        heads lie inside the model's shape, and each stored ``[n_layers, n_heads]`` tensor has that shape."""
        require_fields(meta, ["frame", "baseline", "meta"], path, cls.noun)
        if not isinstance(meta["meta"], dict) or not isinstance(meta["baseline"], dict):
            raise _damaged(path, "meta.json's 'meta' and 'baseline' must be JSON objects")
        try:
            frame = frame_from_json(meta["frame"])
        except (KeyError, TypeError, ValueError, AssertionError) as err:
            raise _damaged(path, f"meta.json's frame is not a table ({type(err).__name__}: {err})") from None
        shape = loaded_shape(meta["meta"], path)
        check_frame_heads(frame, shape, path)
        for name in cls.HEAD_TENSORS:
            if name in tensors:
                check_tensor(tensors, name, shape or (None, None), path)
        return frame, meta["baseline"], meta["meta"]

    HEAD_TENSORS: tuple[str, ...] = ("delta_logprob", "effects")
    """Stored tensors shaped ``[n_layers, n_heads]``, checked against ``meta`` when loaded."""


def head_tensor(frame, column: str, n_layers: int, n_heads: int) -> Tensor:
    """``frame[column]`` (one row per ``layer``, ``head``) as an ``[n_layers, n_heads]`` float32
    tensor, NaN where a head has no row."""
    out = torch.full((n_layers, n_heads), float("nan"))
    out[torch.tensor(frame["layer"].to_numpy(dtype="int64")), torch.tensor(frame["head"].to_numpy(dtype="int64"))] = \
        torch.tensor(frame[column].to_numpy(dtype="float64"), dtype=torch.float32)
    return out


def result_class(kind: str):
    """The class that saves results of ``kind`` (see :data:`KINDS`)."""
    import importlib

    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}; known kinds: {', '.join(KINDS)}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def kind_of(meta: Mapping[str, Any], path: str | os.PathLike) -> str:
    """The ``kind`` of a loaded ``meta.json``: one of :data:`KINDS`, else a ValueError naming the folder."""
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{Path(path) / META}: kind {kind!r} is not a chg_lens result kind ({', '.join(KINDS)}); "
                         "the file is damaged or not a chg_lens result")
    return kind


def load(path: str | os.PathLike):
    """The result saved in the folder ``path``, as the class its ``meta.json`` kind names::

        result = chg_lens.load("runs/chg")      # CHGResult, ContrastiveResult, AblationResult, PatchResult
        result = chg_lens.load("runs/explain")  # ExplainResult: an explain output folder
    """
    tensors, meta = load_bundle(path)
    return result_class(kind_of(meta, path))._from_bundle(tensors, meta, path)


def cached(folder: str | os.PathLike, key: dict[str, Any] | None, fn: Callable[[Path], Any], *,
           kind: "str | type | None" = None):
    """Fit or load: the result saved in ``folder`` if there is one, else ``fn(folder)`` saved there.

    ``key`` (JSON-able settings) is stored in the result's ``meta``; a saved result whose stored
    key differs is a ``ValueError`` naming the settings that differ, so a folder never silently
    serves a fit made with other settings (nor, when ``key`` is given, a result that ``cached`` did
    not write, which has no stored key to compare). ``kind`` (a kind name such as ``"chg"``, or a
    result class such as ``CHGResult``) is the kind ``fn`` makes: a folder holding another kind of
    result is a ``ValueError`` before ``fn`` runs, and ``fn`` returning another kind is a
    ``TypeError``. ``fn`` may keep a checkpoint under ``folder`` (e.g. ``folder / "checkpoint"``) so
    an interrupted fit resumes::

        result = cached(out / "fits" / "ioi", {"updates": 100, "lam": 0.1},
                        lambda folder: fit_chg(model, train, updates=100, checkpoint_dir=folder / "checkpoint"),
                        kind="chg")
    """
    folder = Path(folder)
    want_kind = kind if kind is None or isinstance(kind, str) else getattr(kind, "kind", None)
    if kind is not None:
        result_class(want_kind)  # a known kind name, or a ValueError listing them
    want = None if key is None else json.loads(json.dumps(_jsonable(key), sort_keys=True))
    if (folder / META).exists():
        result = load(folder)
        if want_kind is not None and result.kind != want_kind:
            raise ValueError(f"{folder} holds a {result.kind!r} result ({describe({'meta': result.meta})}), not the "
                             f"{want_kind!r} result this call makes: use another folder, or delete that one to refit")
        stored = result.meta.get(CACHE_KEY)
        if want is not None and stored is None:
            raise ValueError(f"{folder} holds a {result.kind!r} result that results.cached did not write (it stores "
                             "no settings to compare): use another folder, or pass key=None to use it as it is")
        if want is not None:
            differs = [k for k in {**stored, **want} if stored.get(k) != want.get(k)]
            if differs:
                raise ValueError(f"{folder} holds a result of kind {result.kind!r} made with other settings "
                                 f"({', '.join(differs)}): use another output folder, or delete that one to recompute")
        return result
    folder.mkdir(parents=True, exist_ok=True)
    result = fn(folder)
    if want_kind is not None and getattr(result, "kind", None) != want_kind:
        raise TypeError(f"cached(..., kind={want_kind!r}): fn returned {type(result).__name__}, not a {want_kind!r} "
                        "result; nothing was saved")
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
