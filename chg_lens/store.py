"""The one place where chg_lens writes files: atomic file and folder writes, locks and digests.

Every writer of the library goes through here: results (:func:`chg_lens.results.save_bundle`),
checkpoints (:class:`chg_lens.fitting.Checkpointer`), the sweep's index files, the command line's
tables and the explain pipeline's files. Nothing here knows what a result is.

- :func:`write_file` / :func:`write_text` / :func:`write_table`: one file, written under a hidden
  temporary name beside it (``.<name>.tmp-<pid>-<random>``, unique per writer) and renamed into
  place in one step, so a reader sees the old file or the new one, never half of one; the
  temporary file is removed when the write fails.
- :func:`append_line` / :func:`append_lines`: lines appended and flushed to disk (event logs).
- :func:`publish_folder` (a new folder, renamed into place) and :func:`replace_folder` (an
  existing folder swapped for a new one in one atomic exchange, or two renames where the system
  has no exchange, keeping the entries the new folder does not replace).
- :func:`lock` / :func:`try_lock` / :func:`is_locked` (an exclusive ``flock`` on a lock file, with
  the holder's pid in it) and :func:`folder_lock` (the lock ``.<name>.lock`` beside a folder).
- :func:`sha256_file`, :func:`json_digest`, :func:`require_regular_file`.

Example::

    from chg_lens import store
    store.write_text("runs/x/summary.txt", "converged\\n")
    store.write_table(frame, "runs/x/scores.parquet")          # or .csv
    with store.folder_lock("runs/x", "result"):
        ...
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

Writer = Callable[[Path], Any]
"""Writes one file (or fills one folder) at the path it is given: a temporary name, renamed after."""


# ----------------------------------------------------------------------------- names
def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden name beside ``path`` unique to this writer: ``.<name>.tmp-<pid>-<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_private(name: str) -> bool:
    """A lock file or a temporary or set-aside entry that :func:`replace_folder` never carries over."""
    return name.startswith(".") and (name.endswith(".lock") or ".tmp-" in name or ".old-" in name)


def temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary entries (``.<name>.tmp-*``) that writers killed mid-write left in ``folder``."""
    return sorted(p for p in Path(folder).glob(".*.tmp-*") if p.name.startswith("."))


def leftovers(path: str | os.PathLike) -> list[Path]:
    """Temporary (``.tmp-``) and set-aside (``.old-``) entries of ``path`` that a killed writer left."""
    path = Path(path)
    return [p for p in path.parent.glob(f".{path.name}.*") if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- files
def move_aside(path: str | os.PathLike, to: str | os.PathLike) -> Path:
    """Move the file or folder ``path`` (a symlink as a link) to the new name ``to`` in one rename,
    e.g. a damaged result set aside so nothing on disk is lost; a FileExistsError when ``to``
    exists (it is never replaced)."""
    path, to = Path(path), Path(to)
    if to.exists() or to.is_symlink():
        raise FileExistsError(f"{to} exists: a set-aside entry is never replaced")
    os.rename(path, to)
    return to


def write_file(path: str | os.PathLike, write: Writer) -> Path:
    """Write one file atomically: ``write(tmp)`` writes it under a temporary name beside ``path``,
    which then replaces ``path`` in one rename (the temporary file is removed if anything fails).

    Example: ``store.write_file("scores.parquet", lambda p: frame.to_parquet(p, index=False))``.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write one UTF-8 text file atomically (see :func:`write_file`)."""
    return write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dump: Any) -> Path:
    """Write ``obj`` as a JSON file atomically (``dump``: :func:`json.dumps` options, e.g. ``indent=2``)."""
    return write_text(path, json.dumps(obj, **dump))


def write_table(frame, path: str | os.PathLike, **options: Any) -> Path:
    """Write a DataFrame atomically as ``.parquet`` or ``.csv`` (by the file's suffix; no index unless
    ``index=True`` is given)."""
    path = Path(path)
    options.setdefault("index", False)
    if path.suffix == ".parquet":
        return write_file(path, lambda p: frame.to_parquet(p, **options))
    if path.suffix == ".csv":
        return write_file(path, lambda p: frame.to_csv(p, **options))
    raise ValueError(f"{path}: write a table as .parquet or .csv")


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Append lines to a log file (``events.jsonl``, ``jobs.jsonl``) and flush them to disk; a kill
    leaves at most a cut last line, which readers skip."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(line.rstrip("\n") + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file and flush it to disk (see :func:`append_lines`)."""
    append_lines(path, [line])


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """The sha256 of ``obj`` as canonical JSON (sorted keys, no spaces, NaN allowed)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=True, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def require_regular_file(path: str | os.PathLike) -> None:
    """A ValueError unless ``path`` is a plain file (a FIFO, device or folder in a file's place would
    block or break the read); FileNotFoundError when there is nothing there."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        what = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a plain file")
        raise ValueError(f"{path} is {what}, not a regular file: the result is damaged; restore it or write it again")


# ----------------------------------------------------------------------------- locks
def lock_holder(path: str | os.PathLike) -> str:
    """Who holds the lock file ``path`` (``pid N``), as far as it says."""
    try:
        return Path(path).read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def try_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on the lock file ``path`` (created, with its folder) while the block
    runs, if no other process holds it: yields True then, else False at once (no waiting). The file
    holds the holder's pid while held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield True
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (see :func:`try_lock`); a ValueError naming ``what`` and the
    holder when another process holds it."""
    with try_lock(path) as held:
        if not held:
            raise ValueError(f"another process ({lock_holder(path)}) is writing {what} right now (lock {path}); "
                             "wait for it to finish, or use another folder")
        yield


def is_locked(path: str | os.PathLike) -> bool:
    """Whether another process holds the lock file ``path`` now (False when it does not exist)."""
    if not Path(path).exists():
        return False
    with try_lock(path) as held:
        return not held


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str = "result") -> Iterator[None]:
    """Hold an exclusive lock on the folder ``path`` (a ``.<name>.lock`` file beside it); a second
    writer gets a ValueError at once instead of racing on shared files."""
    path = Path(path).expanduser().absolute()
    with lock(path.parent / f".{path.name}.lock", f"the {what} {path}"):
        yield


# ----------------------------------------------------------------------------- folders
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) == 0  # -100 = AT_FDCWD


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Hard-link (or copy) the entries of ``old`` that the new folder does not replace into ``new``."""
    for entry in old.iterdir():
        if entry.name in skip or is_private(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def publish_folder(path: str | os.PathLike, fill: Writer) -> Path:
    """Create the folder ``path`` atomically: ``fill(tmp)`` writes its files into a new hidden folder
    beside it, which is then renamed to ``path`` in one step (removed if anything fails before).
    ``path`` must not exist (or be an empty folder)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists: publish_folder writes new folders only (replace_folder "
                              "replaces one)")
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        fill(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_folder(path: str | os.PathLike, fill: Writer, *, drop: Callable[[Path], Iterable[str]] | None = None,
                   check: Callable[[], None] | None = None, what: str = "result",
                   complete: Callable[[Path], bool] | None = None) -> Path:
    """Write the folder ``path`` (new or existing) atomically as a whole, under :func:`folder_lock`.

    ``check()`` runs first under the lock (e.g. that ``path`` may be written). ``fill(tmp)`` writes
    the new content into a hidden folder beside ``path``; entries of an existing ``path`` that the
    new content does not hold are carried over (hard links), except those ``drop(path)`` names
    (what the new content replaces without a file of the same name). Then the new folder takes
    ``path``'s place in one atomic exchange, or, where the system has none, in two renames (the old
    folder set aside as ``.<name>.old-*`` until the new one is in place). A kill at any point leaves
    the old folder or the new one; what a killed writer left beside ``path`` is removed by the next.
    ``complete(tmp)`` says whether a temporary folder holds a whole copy (then kept when a later step
    fails: after the exchange it is the old folder, between two renames the new one).
    ``path`` may be a symbolic link to a folder: the folder it points to is replaced, the link kept.
    """
    path = Path(path).expanduser().absolute()
    if path.is_symlink():
        path = path.resolve()
    with folder_lock(path, what):
        if check is not None:
            check()
        for stale in leftovers(path):  # left by a writer that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temporary_name(path)
        tmp.mkdir()
        try:
            fill(tmp)
            if path.exists():
                skip = {e.name for e in tmp.iterdir()} | set(drop(path) if drop is not None else ())
                _carry_over(path, tmp, skip)
                if _exchange(tmp, path):
                    shutil.rmtree(tmp)
                else:
                    old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                    os.rename(path, old)
                    os.rename(tmp, path)
                    shutil.rmtree(old)
            else:
                os.rename(tmp, path)
        except BaseException:
            if tmp.exists() and not (complete is not None and complete(tmp)):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path
