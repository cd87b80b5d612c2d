"""Saving and loading results without pickle: tensors in safetensors, everything else in JSON.

A result folder holds ``tensors.safetensors`` and ``meta.json``. Every result type (CHG,
contrastive CHG, ablation, patching) is written through :func:`save_bundle` and read through
:func:`load_bundle`, so a reload is exact and needs no code execution. ``meta.json`` names the
result's ``kind``; :func:`load` returns the right class for it, and :func:`cached` fits a result
or loads the one already saved. A save is atomic as a whole (a new hidden folder, then one rename
or an atomic exchange), locked against a second writer, and records the sha256 of every file in
``meta.json``; a load checks the tensors against it. :func:`check_target` refuses a folder that
holds another kind of result or a different fit before any work starts::

    result = chg_lens.results.load("runs/chg")          # a CHGResult (or ContrastiveResult, ...)
    result = cached("runs/fits/ioi", {"updates": 100}, lambda folder: fit_chg(model, train, updates=100))
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import abc
import json
import math
import os
import platform
import secrets
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from . import checks

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
    "comparison": "chg_lens.compare:ComparisonResult",
}
"""``kind`` in meta.json -> the result class (``module:Class``, imported when loaded)."""


FORMAT = 2
"""meta.json format: 2 adds ``digests`` (sha256 of every file of the bundle) and ``identity``."""
KNOWN_FILES = ("scores.csv", "gates.csv", "frame.csv", "frame.parquet", "evaluation.csv", "overlap.csv",
               "summary.txt", "head_rankings.csv", "report.html", "report_summary.txt", "comparison.csv",
               "comparison.json", "agreement.csv", "faithfulness.html")
"""Files that chg_lens writes beside a result; replacing a result never carries them over."""

FileWriter = Callable[[Path], Any]
"""Writes one file beside the tensors: called with the file's path inside the new bundle folder."""


# ----------------------------------------------------------------------------- locks
@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str = "result") -> Iterator[None]:
    """Hold an exclusive lock on the folder ``path`` (a ``.<name>.lock`` file beside it); a second
    writer gets a ValueError at once instead of racing on shared files."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(f"another process ({holder}) is writing the {what} {path} right now (lock {lock}); "
                             "wait for it to finish, or use another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- writing
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle_files(folder: Path, tensors: Mapping[str, Tensor], meta: dict[str, Any],
                       files: Mapping[str, FileWriter] | None = None) -> dict[str, Any]:
    """Write ``tensors``, the extra ``files`` and, last, ``meta.json`` (with the sha256 of every
    other file under ``digests``) into the existing folder ``folder``; returns the stored meta."""
    clean = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    save_file(clean, str(folder / TENSORS))
    digests = {TENSORS: _sha256(folder / TENSORS)}
    for name, write in (files or {}).items():
        write(folder / name)
        digests[name] = _sha256(folder / name)
    stored = {**_jsonable(meta), "format": FORMAT, "digests": digests, "files": sorted(digests)}
    text = json.dumps(stored, indent=2, sort_keys=True, allow_nan=True)
    with open(folder / META, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return stored


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write one text file by a temporary name and one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # -100 = AT_FDCWD
        return True
    return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Hard-link (or copy) the entries of ``old`` that the new bundle does not replace into ``new``."""
    for entry in old.iterdir():
        if entry.name in skip or _is_private(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _is_private(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".lock") or ".tmp-" in name or ".old-" in name)


def _stale_siblings(path: Path) -> list[Path]:
    return [p for p in path.parent.glob(f".{path.name}.*") if ".tmp-" in p.name or ".old-" in p.name]


def save_bundle(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any], *,
                files: Mapping[str, FileWriter] | None = None, identity: dict[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """Write ``tensors``, JSON-able ``meta`` and the extra ``files`` as the result folder ``path``,
    atomically as a whole.

    The bundle is written into a new hidden folder beside ``path``, which then takes ``path``'s
    place in one rename (an atomic exchange when ``path`` exists), so a kill at any point leaves
    either the old result or the new one, never a mix. ``meta.json`` stores the sha256 of every
    file, checked by :func:`load_bundle`. Entries of an existing folder that the new bundle does not
    replace (a ``checkpoint/``, your own notes) are kept. A second process writing the same folder
    at once gets a ValueError. ``meta["kind"]`` and ``identity`` (what makes two results the same
    fit) are checked against a result already there by :func:`check_target`; ``overwrite``
    replaces a different one.

    Example::

        save_bundle("runs/x", {"gates": g}, {"kind": "chg"}, files={"scores.csv": lambda p: frame.to_csv(p)})
    """
    path = Path(path).expanduser().absolute()
    kind = meta.get("kind")
    check_target(path, kind, identity, overwrite)
    with folder_lock(path):
        check_target(path, kind, identity, overwrite)
        for stale in _stale_siblings(path):  # left by a writer that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            stored = write_bundle_files(tmp, tensors, {**meta, "identity": identity}, files)
            if path.exists():
                old_files = set(read_meta(path).get("files", [])) if (path / META).exists() and not overwrite else set()
                _carry_over(path, tmp, {*stored["files"], META, *KNOWN_FILES, *old_files})
                if _exchange(tmp, path):
                    shutil.rmtree(tmp)
                else:  # no atomic exchange here: two renames, the old copy kept until the new is in place
                    old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                    os.rename(path, old)
                    os.rename(tmp, path)
                    shutil.rmtree(old)
            else:
                os.rename(tmp, path)
        except BaseException:
            if tmp.exists() and not (tmp / META).exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


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
                 overwrite: bool = False, what: str = "the output folder") -> None:
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
    others = sorted(e.name for e in p.iterdir() if e.name != "checkpoint" and not e.name.startswith("."))
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

    With ``verify`` (default), the tensors file must match the sha256 stored in ``meta.json``; a
    changed, damaged or mismatched file is a ValueError naming it (results written before digests
    existed load unchecked)."""
    path = Path(path)
    if not path.is_dir():
        stale = [p for p in _stale_siblings(path.absolute()) if ".old-" in p.name and (p / META).exists()]
        if stale:
            raise FileNotFoundError(f"{path} does not exist: a save was interrupted while replacing it; the previous "
                                    f"result is at {stale[0]} (rename it back to {path.name})")
    if not (path / TENSORS).exists() or not (path / META).exists():
        raise FileNotFoundError(f"{path} is not a chg_lens result folder (needs {TENSORS} and {META})")
    meta = read_meta(path)
    raw = (path / TENSORS).read_bytes()
    want = (meta.get("digests") or {}).get(TENSORS)
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

    @abc.abstractmethod
    def to_frame(self):
        """Implemented by each result class."""

    def tensor(self, column: str) -> Tensor:
        return head_tensor(self.to_frame(), column, int(self.meta["n_layers"]), int(self.meta["n_heads"]))

    def identity(self) -> dict[str, Any] | None:
        """What makes two results of this kind the same fit or analysis (compared before a save
        replaces one; see :func:`check_target`); None compares the kind only."""
        return None

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
                           overwrite=overwrite)

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
        return cls(frame=frame_from_json(meta["frame"]), baseline=meta["baseline"], meta=meta["meta"])


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
        return read_meta(path).get("kind")
    except (OSError, ValueError):
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
