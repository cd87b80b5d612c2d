"""ABA / ABB symbolic rules (Yang et al. 2025, used in the CHG paper): in-context examples
``w1^w2^w1`` (rule ABA) or ``w1^w2^w2`` (rule ABB), one per line, then a query ``w9^w10^`` whose
answer is ``w9`` (ABA) or ``w10`` (ABB). Words are single tokens of the model's tokenizer: 10
distinct random tokens per prompt, 8 for the 4 examples and 2 for the query. The loss is on the last
token only. Rows are built from token ids, so every word stays exactly one token.

Sampling uses ``random.Random(seed)`` over a sorted candidate list: reproducible across processes
(no dependence on Python's hash randomisation).

Example::

    train, val = aba_abb(model, n_prompts=256, seed=0)
    rows = aba_abb_rows(tokenizer, n=8, seed=0)       # structured rows, e.g. to build patching pairs
    data = aba_abb_dataset(tokenizer, rows)           # TaskDataset of exactly these rows
"""

from __future__ import annotations

import random
import re
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from ..data import TaskDataset, TaskSplits, _tokenizer_of
from . import register
from .common import adds_bos, context_limit, fitting_rows, single_token_id

RULES = ("ABA", "ABB")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


@dataclass(frozen=True)
class SymbolicRow:
    """One ABA/ABB prompt as token ids.

    ``examples[k] = (a, b)`` is example ``k``'s word pair (the example reads ``a^b^a`` for ABA,
    ``a^b^b`` for ABB); ``query = (a, b)``; the answer is ``a`` (ABA) or ``b`` (ABB).
    """

    rule: str
    examples: tuple[tuple[int, int], ...]
    query: tuple[int, int]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def answer(self) -> int:
        return self.query[0] if self.rule == "ABA" else self.query[1]

    @property
    def wrong(self) -> int:
        """The query token the other rule would answer."""
        return self.query[1] if self.rule == "ABA" else self.query[0]

    def with_rule(self, rule: str) -> "SymbolicRow":
        """The same words under ``rule`` (each example's third word changes)."""
        return replace(self, rule=rule)

    def with_query(self, a: int, b: int) -> "SymbolicRow":
        return replace(self, query=(int(a), int(b)))


_CANDIDATES: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def word_tokens(tokenizer, pattern: re.Pattern = _WORD) -> list[int]:
    """Sorted ids of tokens that decode to a plain word (letters only, >= 3, no leading space)
    and encode back to exactly that one token; the pool ABA/ABB words come from.

    Example::

        ids = word_tokens(tokenizer)    # GPT-2: ~25k ids
    """
    try:
        return list(_CANDIDATES[tokenizer])
    except (KeyError, TypeError):
        pass
    vocab_size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    raw = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))  # cheap pre-filter on the raw pieces
    cand = [i for i, t in enumerate(raw) if i not in special and t is not None and t.isascii() and t[-1:].isalpha()]
    texts = tokenizer.batch_decode([[i] for i in cand])
    cand, texts = zip(*[(i, t) for i, t in zip(cand, texts) if pattern.match(t)]) if cand else ((), ())
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = sorted(i for i, e in zip(cand, enc) if list(e) == [i])
    try:
        _CANDIDATES[tokenizer] = ids
    except TypeError:  # not weak-referenceable: no cache
        pass
    return list(ids)


def aba_abb_rows(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    n_examples: int = 4,
    words: Sequence[int] | None = None,
) -> list[SymbolicRow]:
    """``n`` structured rows; rules alternate ABA, ABB, ABA, ... (balanced).

    Each row takes ``2 * n_examples + 2`` distinct tokens from ``words`` (default: :func:`word_tokens`).

    Example::

        rows = aba_abb_rows(tokenizer, 4, seed=0)
        rows[0].rule, rows[0].examples[0], rows[0].answer
    """
    tok = _tokenizer_of(tokenizer)
    pool = sorted(int(w) for w in (words if words is not None else word_tokens(tok)))
    need = 2 * n_examples + 2
    if len(pool) < need:
        raise ValueError(f"need {need} distinct single-token words per prompt but only {len(pool)} are available")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w = rng.sample(pool, need)
        ex = tuple((w[2 * k], w[2 * k + 1]) for k in range(n_examples))
        rows.append(SymbolicRow(RULES[i % 2], ex, (w[-2], w[-1])))
    return rows


def aba_abb_dataset(
    model_or_tokenizer: Any,
    rows: Sequence[SymbolicRow],
    separator: str = "^",
    line_break: str = "\n",
    prepend_bos: bool | None = None,
    name: str = "aba_abb",
) -> TaskDataset:
    """Token rows ``[bos] a^b^a \\n ... \\n qa^qb^ answer``; loss on the answer only.

    ``row_meta``: ``rule``, ``answers`` = [correct id, other query id] (logit difference),
    ``query_pos`` (the position that predicts the answer) and ``words`` (the 10 ids in order).
    ``prepend_bos`` None follows the tokenizer.

    Example::

        data = aba_abb_dataset(tokenizer, [row.with_rule("ABB") for row in rows])
    """
    tok = _tokenizer_of(model_or_tokenizer)
    sep = single_token_id(tok, separator, "separator")
    nl = single_token_id(tok, line_break, "line break")
    bos = prepend_bos if prepend_bos is not None else adds_bos(tok)
    if bos and tok.bos_token_id is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
    seqs, masks = [], []
    for r in rows:
        if r.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}; got {r.rule!r}")
        ids = [tok.bos_token_id] if bos else []
        for a, b in r.examples:
            ids += [a, sep, b, sep, a if r.rule == "ABA" else b, nl]
        ids += [r.query[0], sep, r.query[1], sep, r.answer]
        seqs.append(ids)
        masks.append([False] * (len(ids) - 1) + [True])
    keep = fitting_rows([len(s) for s in seqs], context_limit(model_or_tokenizer), name)
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token")
    data = TaskDataset.from_tokens([seqs[i] for i in keep], [masks[i] for i in keep], tok.pad_token_id, name)
    kept = [rows[i] for i in keep]
    data.prompts = [tok.decode(seqs[i]) for i in keep]
    data.row_meta["rule"] = [r.rule for r in kept]
    data.row_meta["answers"] = [[r.answer, r.wrong] for r in kept]
    data.row_meta["query_pos"] = [len(seqs[i]) - 2 for i in keep]
    data.row_meta["words"] = [[t for pair in r.examples for t in pair] + list(r.query) for r in kept]
    data.meta.update(n_examples=len(rows[0].examples) if rows else 0, separator=separator)
    return data


@register("aba_abb", "ABA/ABB symbolic rules: 4 examples 'w1^w2^w1' then a query; loss on the last token")
def aba_abb(
    model_or_tokenizer: Any,
    n_prompts: int = 256,
    n_examples: int = 4,
    seed: int = 0,
    val_fraction: float = 0.2,
    separator: str = "^",
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """ABA/ABB prompts (balanced rules), loss on the answer token.

    Args:
        n_prompts: number of prompts.
        n_examples: in-context examples per prompt (the paper: 4; tokens per prompt = 2 * n + 2).
        seed: seeds the words, and the split.
        val_fraction: share of rows in the validation split.
        separator: the single-token symbol between words (Yang et al.: ``^``).

    Example::

        train, val = aba_abb(model, n_prompts=256)
        train.row_meta["answers"][0]    # [correct id, other query word id]
    """
    if n_prompts < 2:
        raise ValueError("n_prompts must be at least 2 (train and validation)")
    tok = _tokenizer_of(model_or_tokenizer)
    rows = aba_abb_rows(tok, n_prompts, seed, n_examples)
    return aba_abb_dataset(model_or_tokenizer, rows, separator, prepend_bos=prepend_bos).split(val_fraction, seed)


SYMBOLIC_KINDS = ("abstraction", "induction", "retrieval")
"""Yang et al.'s three head types, each screened by one corruption of :func:`symbolic_pairs`."""


def symbolic_pairs(model, kind: str, n_prompts: int = 64, seed: int = 0, n_examples: int = 4):
    """Clean/corrupted ABA/ABB pairs for one of Yang et al.'s head types, and where to patch.

    - ``"induction"``: the corrupted prompt has the same words under the other rule (its examples
      induce the other symbol); patch at the last position; effect on the logit of the clean answer
      minus the answer the corrupted rule gives (symbolic induction heads carry the induced symbol).
    - ``"abstraction"``: same pair, patched at the example positions where the rule shows (each
      example's third word); heads there abstract which symbol a word plays.
    - ``"retrieval"``: the corrupted prompt keeps the rule and the examples but swaps the query's
      two words; patched at the last position; heads that retrieve the actual token move the logit
      toward the clean answer token.

    Returns ``(clean, corrupted, positions)`` with ``answers`` = [clean answer, corrupted answer]
    (also importable as ``chg_lens.patching.symbolic_pairs``).

    Example::

        clean, corrupted, pos = symbolic_pairs(model, "induction", n_prompts=32)
        chg_lens.patching.patch_heads(model, clean, corrupted, positions=pos, metric="logit_diff")
    """
    import torch

    if kind not in SYMBOLIC_KINDS:
        raise ValueError(f"kind must be one of {SYMBOLIC_KINDS}; got {kind!r}")
    tok = _tokenizer_of(model)
    rows = aba_abb_rows(tok, n_prompts, seed, n_examples)
    if kind == "retrieval":
        other = [r.with_query(r.query[1], r.query[0]) for r in rows]
    else:
        other = [r.with_rule("ABB" if r.rule == "ABA" else "ABA") for r in rows]
    clean = aba_abb_dataset(model, rows, name="aba_abb")
    corrupted = aba_abb_dataset(model, other, name=f"aba_abb_{kind}")
    # Logit difference: clean answer vs the answer the corrupted prompt implies.
    clean.row_meta["answers"] = [[a[0], c[0]] for a, c in zip(clean.row_meta["answers"], corrupted.row_meta["answers"])]
    if kind == "abstraction":
        mask = torch.zeros_like(corrupted.tokens, dtype=torch.bool)
        offset = corrupted.lengths - (6 * n_examples + 5)  # 1 with a BOS token, else 0
        index = torch.arange(len(corrupted))
        for k in range(n_examples):
            mask[index, offset + 6 * k + 4] = True  # a^b^[x]: the third word of example k
        positions: Any = mask
    else:
        positions = "last"
    return clean, corrupted, positions
