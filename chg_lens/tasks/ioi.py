"""Indirect object identification (Wang et al. 2022): "When Mary and John went to the store, John
gave a drink to" -> " Mary". Names are single tokens of the model's tokenizer; ABBA and BABA orders
alternate; the loss is on the indirect object.

Example::

    train, val = ioi(model, n_prompts=256, seed=0)
    clean, corrupted = ioi_pairs(model, n_prompts=64)     # ABC corruption, for patching
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ..data import TaskDataset, TaskSplits, _tokenizer_of
from . import register

TEMPLATES = (
    "When{A} and{B} went to the {place},{S} gave a {object} to",
    "When{A} and{B} got a {object} at the {place},{S} decided to give it to",
    "After{A} and{B} went to the {place},{S} gave a {object} to",
    "Then,{A} and{B} had a long argument, and afterwards{S} said to",
    "While{A} and{B} were working at the {place},{S} gave a {object} to",
    "Friends{A} and{B} went to the {place}.{S} gave a {object} to",
    "The {place} was quiet when{A} and{B} arrived, and{S} handed a {object} to",
    "Afterwards,{A} and{B} went to the {place}, and{S} brought a {object} to",
)
NAMES = (
    "Mary", "John", "Tom", "James", "Paul", "Mark", "David", "Michael", "Sarah", "Anna", "Lisa",
    "Kate", "Peter", "Robert", "Daniel", "Laura", "Emma", "Jack", "Alice", "Susan", "George",
    "Steven", "Helen", "Frank", "Linda", "Ryan", "Karen", "Jane", "Adam", "Eric", "Amy", "Chris",
    "Kevin", "Jason", "Rachel", "Andrew", "Sam", "Ben", "Max", "Luke", "Anne", "Martin",
)
PLACES = ("store", "park", "school", "office", "garden", "station", "restaurant", "hospital", "market", "library")
OBJECTS = ("drink", "book", "ring", "ball", "key", "gift", "letter", "bag", "flower", "computer")


def single_token_names(tokenizer, names: Sequence[str] = NAMES) -> list[str]:
    """Names that are one token with a leading space (" Mary") in this tokenizer."""
    return [n for n in names if len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1]


def _sample(tokenizer, n_prompts: int, seed: int, templates, names):
    usable = single_token_names(tokenizer, names)
    if len(usable) < 3:
        raise ValueError(f"only {len(usable)} of the names are single tokens for this tokenizer; give more names")
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        template = templates[i % len(templates)]
        io, s, c = rng.sample(usable, 3)
        order = "ABBA" if i % 2 == 0 else "BABA"
        a, b = (io, s) if order == "ABBA" else (s, io)
        fill = {"place": rng.choice(PLACES), "object": rng.choice(OBJECTS)}
        clean = template.format(A=" " + a, B=" " + b, S=" " + s, **fill)
        corrupted = template.format(A=" " + a, B=" " + b, S=" " + c, **fill)  # ABC: S replaced by C
        rows.append({"prompt": clean, "corrupted": corrupted, "io": io, "s": s, "c": c, "order": order})
    return rows


def _dataset(tokenizer, rows, key: str, prepend_bos, name: str) -> TaskDataset:
    data = TaskDataset.from_prompts(tokenizer, [r[key] for r in rows], [" " + r["io"] for r in rows],
                                    prepend_bos=prepend_bos, name=name)
    ids = lambda n: tokenizer(" " + n, add_special_tokens=False)["input_ids"][0]
    data.row_meta["answers"] = [[ids(r["io"]), ids(r["s"])] for r in rows]  # correct, wrong (logit difference)
    data.row_meta["order"] = [r["order"] for r in rows]
    return data


@register("ioi", "indirect object identification: '...John gave a drink to' -> ' Mary' (ABBA/BABA)")
def ioi(
    model_or_tokenizer: Any,
    n_prompts: int = 256,
    seed: int = 0,
    val_fraction: float = 0.2,
    templates: Sequence[str] = TEMPLATES,
    names: Sequence[str] = NAMES,
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """IOI prompts, loss on the indirect object; ``row_meta["answers"]`` holds (IO, S) token ids."""
    tok = _tokenizer_of(model_or_tokenizer)
    if n_prompts < 2:
        raise ValueError("n_prompts must be at least 2 (train and validation)")
    rows = _sample(tok, n_prompts, seed, templates, names)
    return _dataset(tok, rows, "prompt", prepend_bos, "ioi").split(val_fraction, seed)


def ioi_pairs(
    model_or_tokenizer: Any,
    n_prompts: int = 64,
    seed: int = 0,
    templates: Sequence[str] = TEMPLATES,
    names: Sequence[str] = NAMES,
    prepend_bos: bool | None = None,
) -> tuple[TaskDataset, TaskDataset]:
    """Clean prompts and their ABC-corrupted twins (the second S replaced by a third name), row by
    row the same length, both scored on the clean indirect object."""
    tok = _tokenizer_of(model_or_tokenizer)
    rows = _sample(tok, n_prompts, seed, templates, names)
    clean = _dataset(tok, rows, "prompt", prepend_bos, "ioi")
    corrupted = _dataset(tok, rows, "corrupted", prepend_bos, "ioi_abc")
    if clean.tokens.shape != corrupted.tokens.shape or not bool((clean.lengths == corrupted.lengths).all()):
        raise ValueError("clean and corrupted prompts tokenize to different lengths; use single-token names")
    return clean, corrupted
