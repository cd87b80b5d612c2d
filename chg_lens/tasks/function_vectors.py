"""Function-vector tasks (Todd et al. 2024): word pairs such as antonym ("hot" -> "cold") in two
formats, as the CHG paper uses them (appendix 6.1):

- ``"icl"``: ``n_shots`` solved examples ``Q: x\\nA: y`` separated by blank lines, then
  ``Q: query\\nA:``; the target is ``" y"``.
- ``"instruction"``: the task's instruction (the paper's six, or your own), one solved example and
  the query.

Examples come from a held-apart pool (the ``pool_size`` shortest pairs, as the paper chose example
problems) that never holds a query. The loss is on the answer tokens.

Data: a folder holding ``<task>.json`` (``function_vectors/abstractive`` or ``extractive`` of the
shared data, or their parent) or a path to any JSON list of ``{"input", "output"}`` records.

Example::

    train, val = function_vector(model, task="antonym", fmt="icl", data_dir="../shared/data/function_vectors")
    formats = fv_formats(model, task="antonym", data_dir=...)        # {"icl": ..., "instruction": ...}, row-matched
    clean, corrupted = fv_pairs(model, task="antonym", data_dir=...)  # example answers shuffled
"""

from __future__ import annotations

import random
from typing import Any

from ..data import TaskDataset, TaskSplits, _tokenizer_of
from . import register
from .common import (example_pool, few_shot_prompt, find_file, load_located_records, matched_prompt_datasets,
                     prompt_lengths, require_data_dir, text_columns)

INSTRUCTIONS = {
    "antonym": "Given an input word, generate the word with opposite meaning.",
    "capitalize": "Given an input word, generate the same word with a capital first letter.",
    "country-capital": "Given a country name, generate the capital city.",
    "english-french": "Given an English word, generate the French translation of the word.",
    "present-past": "Given a verb in the present tense, generate the verb's simple past inflection.",
    "singular-plural": "Given a singular noun, generate its plural inflection.",
}
"""The paper's instructions (from Todd et al.) for its six function-vector tasks."""

FV_TASKS = tuple(INSTRUCTIONS)
FORMATS = ("icl", "instruction")
_WHERE = ("pass the folder holding <task>.json, e.g. ../shared/data/function_vectors "
          "(its abstractive/ and extractive/ subfolders are searched), or a JSON file of {input, output} records")


def load_fv_records(task: str, data_dir: Any) -> list[tuple[str, str]]:
    """(input, output) pairs of a function-vector task, read from ``data_dir``.

    Example::

        load_fv_records("antonym", "../shared/data/function_vectors")[:2]   # [("flawed", "perfect"), ...]
    """
    root = require_data_dir(data_dir, "fv", _WHERE)
    path = find_file(root, [f"{task}.json"], ["", "abstractive", "extractive", "function_vectors/abstractive",
                                               "function_vectors/extractive"], f"fv:{task}")
    return text_columns(load_located_records(path), ("input", "output"), str(path), can_drop=False)


def _instruction(task: str, instruction: str | None) -> str:
    if instruction is not None:
        return instruction
    if task not in INSTRUCTIONS:
        raise ValueError(f"no built-in instruction for task '{task}' (known: {', '.join(FV_TASKS)}); "
                         "pass instruction='...'")
    return INSTRUCTIONS[task]


def _rows(tok, task, n_prompts, n_shots, seed, data_dir, pool_size, instruction, fmts):
    pairs = load_fv_records(task, data_dir)
    if n_shots < 0 or n_shots > pool_size:
        raise ValueError(f"n_shots={n_shots} must be between 0 and pool_size={pool_size}; raise pool_size")
    pool, queries, rng = example_pool(pairs, n_prompts, pool_size, seed, f"fv:{task}")
    variants: dict[str, tuple[list[str], list[str]]] = {f: ([], []) for f in fmts}
    meta: dict[str, list] = {"query": [], "answer": [], "examples": [], "instruction_example": []}
    for x, y in queries:
        shots = rng.sample(pool, n_shots)
        one = rng.choice(pool)
        for f in fmts:
            p, t = (few_shot_prompt(shots, x, y) if f == "icl"
                    else few_shot_prompt([one], x, y, instruction=_instruction(task, instruction)))
            variants[f][0].append(p)
            variants[f][1].append(t)
        meta["query"].append(x)
        meta["answer"].append(y)
        meta["examples"].append([list(s) for s in shots])  # the ICL examples
        meta["instruction_example"].append(list(one))
    return variants, meta


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}; got {fmt!r}")


@register("fv", "function-vector word pairs (Todd et al.): --task-option task=antonym --task-option fmt=icl|instruction")
def function_vector(
    model_or_tokenizer: Any,
    task: str = "antonym",
    fmt: str = "icl",
    n_prompts: int = 256,
    n_shots: int = 10,
    seed: int = 0,
    data_dir: Any = None,
    val_fraction: float = 0.2,
    pool_size: int = 10,
    instruction: str | None = None,
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """A function-vector task in one format; loss on the answer tokens.

    Args:
        task: file stem of the task (``antonym``, ``capitalize``, ``country-capital``,
            ``english-french``, ``present-past``, ``singular-plural`` or any other ``<task>.json``).
        fmt: ``"icl"`` (``n_shots`` examples) or ``"instruction"`` (instruction + one example).
        n_prompts: number of queries (capped, with a warning, at the pairs left after the pool).
        n_shots: examples per ICL prompt, drawn without replacement from the pool.
        seed: seeds the pool's tie order, the queries, the examples and the split.
        data_dir: folder with ``<task>.json`` (subfolders abstractive/extractive searched) or a JSON file.
        val_fraction: share of rows in the validation split.
        pool_size: size of the held-apart example pool (the paper: 10).
        instruction: replaces the built-in instruction (needed for tasks outside the six).

    ``row_meta``: ``query``, ``answer``, ``examples`` (the ICL pairs), ``instruction_example`` and
    ``query_pos`` (the last prompt position, which predicts the first answer token).

    Example::

        train, val = function_vector(model, "antonym", "icl", data_dir="../shared/data/function_vectors")
    """
    _check_fmt(fmt)
    tok = _tokenizer_of(model_or_tokenizer)
    variants, meta = _rows(tok, task, n_prompts, n_shots, seed, data_dir, pool_size, instruction, [fmt])
    data = matched_prompt_datasets(model_or_tokenizer, {f"fv_{task}_{fmt}": variants[fmt]}, meta,
                                   prepend_bos)[f"fv_{task}_{fmt}"]
    data.meta.update(task=task, fmt=fmt, n_shots=n_shots if fmt == "icl" else 1)
    return data.split(val_fraction, seed)


def fv_formats(
    model_or_tokenizer: Any,
    task: str = "antonym",
    n_prompts: int = 256,
    n_shots: int = 10,
    seed: int = 0,
    data_dir: Any = None,
    pool_size: int = 10,
    instruction: str | None = None,
    prepend_bos: bool | None = None,
) -> dict[str, TaskDataset]:
    """The same queries and targets in both formats: ``{"icl": ..., "instruction": ...}``; row ``i``
    of each is the same problem (for contrastive CHG). Split both with the same seed for matched
    splits: ``formats["icl"].split(0.2, seed)`` and ``formats["instruction"].split(0.2, seed)``.

    Example::

        f = fv_formats(model, "antonym", data_dir="../shared/data/function_vectors")
        icl_train, icl_val = f["icl"].split(0.2, 0)
    """
    tok = _tokenizer_of(model_or_tokenizer)
    variants, meta = _rows(tok, task, n_prompts, n_shots, seed, data_dir, pool_size, instruction, FORMATS)
    named = {f"fv_{task}_{f}": variants[f] for f in FORMATS}
    built = matched_prompt_datasets(model_or_tokenizer, named, meta, prepend_bos)
    out = {}
    for f in FORMATS:
        out[f] = built[f"fv_{task}_{f}"]
        out[f].meta.update(task=task, fmt=f, n_shots=n_shots if f == "icl" else 1)
    return out


def fv_pairs(
    model_or_tokenizer: Any,
    task: str = "antonym",
    n_prompts: int = 64,
    n_shots: int = 10,
    seed: int = 0,
    data_dir: Any = None,
    pool_size: int = 10,
    prepend_bos: bool | None = None,
    max_tries: int = 20,
) -> tuple[TaskDataset, TaskDataset]:
    """Clean ICL prompts and corrupted twins whose example answers are shuffled among the examples
    (every example gets another example's answer: Todd et al.'s corruption); same query and target.

    Row ``i`` of both has the same token length (a row whose shuffles never tokenize to the clean
    length in ``max_tries`` draws is dropped); ``row_meta["query_pos"]`` is the last prompt
    position, ``row_meta["target_id"]`` the answer's first token.

    Example::

        clean, corrupted = fv_pairs(model, "antonym", data_dir="../shared/data/function_vectors")
    """
    if n_shots < 2:
        raise ValueError("fv_pairs needs n_shots >= 2 to shuffle answers among examples")
    tok = _tokenizer_of(model_or_tokenizer)
    variants, meta = _rows(tok, task, n_prompts, n_shots, seed, data_dir, pool_size, None, ["icl"])
    rng = random.Random(f"fv_pairs:{seed}")
    clean_p, clean_t = variants["icl"]
    clean_len = prompt_lengths(tok, clean_p, clean_t, prepend_bos)
    keep, corrupt_p, shuffles = [], [], []
    for i, (x, y) in enumerate(zip(meta["query"], meta["answer"])):
        shots = meta["examples"][i]
        for _ in range(max_tries):
            perm = _derangement(len(shots), rng)
            p, _t = few_shot_prompt([(shots[j][0], shots[perm[j]][1]) for j in range(len(shots))], x, y)
            if prompt_lengths(tok, [p], [clean_t[i]], prepend_bos)[0] == clean_len[i]:
                keep.append(i)
                corrupt_p.append(p)
                shuffles.append(perm)
                break
    if len(keep) < len(clean_p):
        import warnings

        warnings.warn(f"fv_pairs: dropped {len(clean_p) - len(keep)} rows whose corrupted prompt never "
                      "tokenized to the clean length", stacklevel=2)
    if not keep:
        raise ValueError("fv_pairs: no row has a corrupted prompt of the clean prompt's length")
    row_meta = {k: [v[i] for i in keep] for k, v in meta.items()}
    row_meta["shuffle"] = shuffles
    targets = [clean_t[i] for i in keep]
    built = matched_prompt_datasets(
        model_or_tokenizer,
        {f"fv_{task}_icl": ([clean_p[i] for i in keep], targets), f"fv_{task}_icl_shuffled": (corrupt_p, targets)},
        row_meta, prepend_bos)
    clean, corrupted = built[f"fv_{task}_icl"], built[f"fv_{task}_icl_shuffled"]
    ids = [int(r[q + 1]) for r, q in zip(clean.tokens, clean.row_meta["query_pos"])]
    for d in (clean, corrupted):
        d.row_meta["target_id"] = list(ids)
        d.meta.update(task=task, fmt="icl", n_shots=n_shots)
    if not bool((clean.lengths == corrupted.lengths).all()):  # guaranteed by construction above
        raise RuntimeError("fv_pairs: clean and corrupted rows differ in length")
    return clean, corrupted


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2)."""
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm
