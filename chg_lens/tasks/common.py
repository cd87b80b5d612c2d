"""Shared pieces of the task library: the few-shot prompt format, reading record files, finding a
task's data file and turning prompt/target pairs into a :class:`~chg_lens.data.TaskDataset` while
dropping rows longer than the model's context.

Every task that formats examples uses :func:`few_shot_prompt`, so all tasks agree on one format::

    prompt, target = few_shot_prompt([("hot", "cold"), ("up", "down")], "big", "small")
    # prompt == "Q: hot\\nA: cold\\n\\nQ: up\\nA: down\\n\\nQ: big\\nA:", target == " small"
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .. import models
from ..data import TaskDataset, _tokenizer_of, first_target_position

Pair = tuple[str, str]


# ----------------------------------------------------------------------------- formatting
def few_shot_prompt(
    examples: Sequence[Pair],
    query: str,
    answer: str,
    instruction: str | None = None,
    input_prefix: str = "Q: ",
    output_prefix: str = "A:",
    io_sep: str = "\n",
    example_sep: str = "\n\n",
    answer_sep: str = " ",
) -> tuple[str, str]:
    """Format solved ``examples`` and a ``query`` as ``(prompt, target)``.

    Each example is ``{input_prefix}{x}{io_sep}{output_prefix}{answer_sep}{y}``; examples are joined
    by ``example_sep``, an optional ``instruction`` comes first (followed by ``example_sep``) and the
    query ends the prompt at ``output_prefix``. The target is ``answer_sep + answer``, so the loss
    lies on exactly the answer's tokens (with its leading space).

    Example::

        few_shot_prompt([("hot", "cold")], "big", "small", instruction="Give the opposite.")
        # ("Give the opposite.\\n\\nQ: hot\\nA: cold\\n\\nQ: big\\nA:", " small")
    """
    parts = [] if instruction is None else [instruction]
    parts += [f"{input_prefix}{x}{io_sep}{output_prefix}{answer_sep}{y}" for x, y in examples]
    parts.append(f"{input_prefix}{query}{io_sep}{output_prefix}")
    return example_sep.join(parts), answer_sep + answer


def example_pool(
    records: Sequence[Pair],
    n_prompts: int,
    pool_size: int,
    seed: int,
    task: str,
    keep_shortest: int | None = None,
) -> tuple[list[Pair], list[Pair], "random.Random"]:
    """Hold ``pool_size`` example problems apart and draw ``n_prompts`` queries from the rest.

    As the paper chose example problems, the pool is the ``pool_size`` shortest records (length in
    characters: a fast, tokenizer-independent stand-in for token length; ties in seeded order); a
    query never shares its input with a pool example. With
    ``keep_shortest``, only that many shortest records are used at all (the math tasks). ``n_prompts``
    is capped, with a warning, at what is left. Returns (pool, queries, the seeded rng to go on with).

    Example::

        pool, queries, rng = example_pool([("hot", "cold"), ...], n_prompts=100, pool_size=10, seed=0, task="antonym")
    """
    if n_prompts < 2:
        raise ValueError("n_prompts must be at least 2 (train and validation)")
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    order.sort(key=lambda i: len(records[i][0]) + len(records[i][1]))  # stable: seeded order among ties
    if keep_shortest is not None:
        order = order[:keep_shortest]
    pool = [records[i] for i in order[:pool_size]]
    pool_inputs = {x for x, _ in pool}
    rest = [records[i] for i in order[pool_size:] if records[i][0] not in pool_inputs]
    if len(rest) < 2:
        raise ValueError(f"task '{task}' has {len(records)} records: too few left after the example pool of {pool_size}")
    if n_prompts > len(rest):
        warnings.warn(f"task '{task}': n_prompts={n_prompts} but only {len(rest)} queries are left after the "
                      f"example pool; using {len(rest)}", stacklevel=3)
        n_prompts = len(rest)
    return pool, rng.sample(rest, n_prompts), rng


# ----------------------------------------------------------------------------- files
def require_data_dir(data_dir: Any, task: str, what: str) -> Path:
    """``data_dir`` as an existing Path, or a ValueError that says what to pass."""
    if data_dir is None:
        raise ValueError(
            f"task '{task}' needs its data: pass data_dir=... (CLI: --data-dir DIR), {what}"
        )
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"task '{task}': data_dir {str(path)!r} does not exist; {what}")
    return path


def find_file(root: Path, names: Sequence[str], subdirs: Sequence[str], task: str) -> Path:
    """The first ``root/sub/name`` that exists (``root`` itself may be the file)."""
    if root.is_file():
        return root
    tried = []
    for sub in subdirs:
        for name in names:
            p = root / sub / name if sub else root / name
            tried.append(str(p))
            if p.is_file():
                return p
    raise FileNotFoundError(f"task '{task}': no data file found; looked for: {', '.join(tried[:8])}"
                            + (" ..." if len(tried) > 8 else ""))


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list, JSONL, CSV, TSV or parquet file into a list of dicts.

    Example::

        load_records("pairs.jsonl")   # [{"input": "hot", "output": "cold"}, ...]
    """
    return [r for _, r in load_located_records(path)]


def load_located_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Like :func:`load_records`, each record with where it came from (``"line 7"`` of a CSV, TSV or
    JSONL file, ``"record 3"`` of a JSON list, ``"row 3"`` of a parquet file), for error messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    stat = path.stat()
    return list(_read_records(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=32)
def _read_records(name: str, mtime_ns: int, size: int) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Parsed records, cached per file version (tasks rebuilt with other seeds do not reparse)."""
    return tuple(_parse_records(Path(name)))


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with a leading byte-order mark (an Excel export) dropped."""
    try:
        return path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({err.reason}); save the file as UTF-8") from None


def _parse_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict):  # {"examples": [...]} (BIG-bench) or {"data": [...]}
            for key in ("examples", "data", "rows"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
            else:
                raise ValueError(f"{path}: a JSON object without an 'examples' or 'data' list; give a list of records")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        for i, r in enumerate(data):
            if not isinstance(r, dict):
                raise ValueError(f"{path}, record {i + 1}: expected a JSON object with named fields (e.g. "
                                 f'{{"input": ..., "output": ...}}); got {type(r).__name__} {json.dumps(r)[:40]}')
        return [(f"record {i + 1}", r) for i, r in enumerate(data)]
    if suffix in (".jsonl", ".ndjson"):
        out = []
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg} at column {err.colno}); fix or "
                                 "remove the line") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object per line; got {type(rec).__name__}")
            out.append((f"line {n}", rec))
        return out
    if suffix in (".csv", ".tsv"):
        text = _read_text(path)
        import io

        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        out = []
        for rec in reader:
            if None in rec:  # more fields than the header
                raise ValueError(f"{path}, line {reader.line_num}: {len(rec[None]) + len(reader.fieldnames)} fields "
                                 f"but the header has {len(reader.fieldnames)}; quote fields that hold the delimiter")
            out.append((f"line {reader.line_num}", rec))
        return out
    if suffix == ".parquet":
        import pandas as pd

        return [(f"row {i + 1}", r) for i, r in enumerate(pd.read_parquet(path).to_dict("records"))]
    raise ValueError(f"{path}: unknown file type {suffix!r}; use .json, .jsonl, .csv, .tsv or .parquet")


def _missing(value: Any) -> str | None:
    """Why ``value`` is not usable text: "missing" (None, NaN: a bare ``NaN`` in a JSON file), "empty",
    "non-finite (inf)" (a bare ``Infinity``), or None when it is fine."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing"
    if isinstance(value, float) and not math.isfinite(value):
        return f"non-finite ({value})"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return None


def text_columns(located: Sequence[tuple[str, dict]], names: Sequence[str], source: str,
                 drop_empty: bool = False, can_drop: bool = True) -> list[tuple[str, ...]]:
    """The ``names`` columns of every record as strings. A missing (absent, ``null``, NaN) or empty
    value is a ValueError naming the file, line and column (and, when ``can_drop``, the
    ``drop_empty`` option), or, with ``drop_empty``, the row is dropped and a warning says how many were.

    Example::

        text_columns(load_located_records("pairs.csv"), ("input", "output"), "pairs.csv")
    """
    columns([r for _, r in located], names, source)
    out, dropped = [], []
    for where, rec in located:
        why = [(n, _missing(rec.get(n))) for n in names]
        bad = [(n, w) for n, w in why if w is not None]
        if bad:
            if drop_empty:
                dropped.append(where)
                continue
            n, w = bad[0]
            todo = ("fill it in, remove the row, or drop such rows with drop_empty=True (CLI: --task-option "
                    "drop_empty=true)") if can_drop else "fill it in or remove the record"
            raise ValueError(f"{source}, {where}, column {n!r}: {w} value; {todo}")
        out.append(tuple(str(rec[n]) for n in names))
    if dropped:
        warnings.warn(f"{source}: dropped {len(dropped)} of {len(located)} row(s) with a missing or empty "
                      f"{'/'.join(names)} (first: {dropped[0]})", stacklevel=2)
    return out


def columns(records: Sequence[dict], names: Iterable[str], source: str) -> None:
    """Raise if a record lacks one of ``names``, listing the columns it has."""
    if not records:
        raise ValueError(f"{source}: no records")
    missing = [n for n in names if n not in records[0]]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; it has {sorted(records[0])}")


def load_hf_dataset(name: str, split: str = "train", config: str | None = None, **kwargs: Any) -> list[dict]:
    """Records of a Hugging Face dataset (needs internet; ``datasets`` is a dependency of chg_lens)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"loading the Hugging Face dataset {name!r} needs the `datasets` package: "
            "pip install datasets (a dependency of chg_lens; or pass a local file / data_dir instead)"
        ) from e
    return list(datasets.load_dataset(name, config, split=split, **kwargs))


def looks_like_hub_name(spec: Any) -> bool:
    """True for ``"owner/name"`` strings that are not an existing local path."""
    s = str(spec)
    file_like = Path(s).suffix.lower() in (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")
    return (isinstance(spec, str) and s.count("/") == 1 and not file_like and not s.startswith((".", "/", "~"))
            and not Path(s).expanduser().exists())


# ----------------------------------------------------------------------------- tokens
def single_token_id(tokenizer, text: str, what: str = "word") -> int:
    """The id of ``text`` if it is exactly one token, else a ValueError naming it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the {what} {text!r} is {len(ids)} tokens for this tokenizer, not one; choose another")
    return int(ids[0])


def context_limit(model_or_tokenizer: Any, max_length: int | None = None) -> int | None:
    """The longest row allowed: ``max_length``, else the model's context, else the tokenizer's."""
    if max_length is not None:
        return int(max_length)
    if models.is_tl_model(model_or_tokenizer):
        return models.n_ctx(model_or_tokenizer)
    limit = getattr(model_or_tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**7 else None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts an encoding with BOS."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def prompt_lengths(tokenizer, prompts: Sequence[str], targets: Sequence[str], prepend_bos: bool | None) -> list[int]:
    """Token count of each prompt+target row as :meth:`TaskDataset.from_prompts` builds it."""
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    out = []
    for p, t in zip(p_ids, t_ids):
        n = len(p)
        starts = bool(p) and p[0] == bos
        if prepend_bos is True and not starts:
            n += 1
        elif prepend_bos is False and starts:
            n -= 1
        out.append(n + len(t))
    return out


def fitting_rows(lengths: Sequence[int], limit: int | None, task: str) -> list[int]:
    """Indices of rows that fit ``limit``; warns how many were dropped, refuses when none is left."""
    if limit is None:
        return list(range(len(lengths)))
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    dropped = len(lengths) - len(keep)
    if not keep:
        raise ValueError(f"task '{task}': all {len(lengths)} rows are longer than the context of {limit} tokens "
                         f"(shortest {min(lengths)}); use fewer examples or a model with a longer context")
    if dropped:
        warnings.warn(f"task '{task}': dropped {dropped} of {len(lengths)} rows longer than the context of "
                      f"{limit} tokens", stacklevel=3)
    return keep


def prompt_dataset(
    model_or_tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    name: str,
    row_meta: dict[str, list] | None = None,
    prepend_bos: bool | None = None,
    max_length: int | None = None,
) -> TaskDataset:
    """:meth:`TaskDataset.from_prompts` after dropping rows longer than the context (with a warning).

    ``row_meta`` lists stay aligned with the kept rows; ``row_meta["query_pos"]`` is added: the
    position of the last prompt token (the one that predicts the first target token).

    Example::

        data = prompt_dataset(tokenizer, ["Q: hot\nA:"], [" cold"], name="antonym")
    """
    return matched_prompt_datasets(model_or_tokenizer, {name: (prompts, targets)}, row_meta,
                                   prepend_bos, max_length)[name]


def matched_prompt_datasets(
    model_or_tokenizer: Any,
    variants: dict[str, tuple[Sequence[str], Sequence[str]]],
    row_meta: dict[str, list] | None = None,
    prepend_bos: bool | None = None,
    max_length: int | None = None,
) -> dict[str, TaskDataset]:
    """Several prompt variants of the same rows (name -> (prompts, targets)); a row too long in any
    variant is dropped from all, so row ``i`` stays the same problem in every returned dataset."""
    tok = _tokenizer_of(model_or_tokenizer)
    limit = context_limit(model_or_tokenizer, max_length)
    n = {len(p) for p, _ in variants.values()}
    if len(n) != 1:
        raise ValueError(f"variants have different numbers of rows: {sorted(n)}")
    worst = [0] * n.pop()
    for prompts, targets in variants.values():
        worst = [max(a, b) for a, b in zip(worst, prompt_lengths(tok, prompts, targets, prepend_bos))]
    keep = fitting_rows(worst, limit, "/".join(variants))
    out = {}
    for name, (prompts, targets) in variants.items():
        data = TaskDataset.from_prompts(tok, [prompts[i] for i in keep], [targets[i] for i in keep],
                                        prepend_bos=prepend_bos, name=name)
        for k, v in (row_meta or {}).items():
            data.row_meta[k] = [v[i] for i in keep]
        data.row_meta["query_pos"] = first_target_position(data.loss_mask).tolist()
        data.meta["n_dropped_too_long"] = len(worst) - len(keep)
        out[name] = data
    return out
