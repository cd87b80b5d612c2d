"""Induction: a random token sequence repeated once; the loss is on the repeated half (except its
first token, which nothing before it predicts), where an induction mechanism can copy.

Example::

    train, val = induction(model, n_prompts=256, seq_len=20)
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import TaskDataset, TaskSplits, _tokenizer_of
from . import register
from .common import adds_bos, context_limit
from .symbolic import word_tokens


@register("induction", "repeated random token sequences; loss on the repeated half")
def induction(
    model_or_tokenizer: Any,
    n_prompts: int = 256,
    seq_len: int = 20,
    seed: int = 0,
    val_fraction: float = 0.2,
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """Rows ``[bos] t_1..t_n t_1..t_n`` of distinct word tokens (see :func:`~chg_lens.tasks.symbolic.word_tokens`);
    loss on ``t_2..t_n`` of the second copy. ``row_meta["repeat_start"]`` is the position of the second ``t_1``.

    Args:
        n_prompts: number of rows.
        seq_len: length of the random sequence (rows are ``2 * seq_len`` tokens, plus BOS).
        seed: seeds the tokens (torch.Generator) and the split.
        val_fraction: share of rows for validation.
        prepend_bos: None follows the tokenizer.

    Example::

        train, val = induction(tokenizer, n_prompts=64, seq_len=10)
    """
    if n_prompts < 2 or seq_len < 2:
        raise ValueError("n_prompts and seq_len must be at least 2")
    tok = _tokenizer_of(model_or_tokenizer)
    bos = prepend_bos if prepend_bos is not None else adds_bos(tok)
    limit = context_limit(model_or_tokenizer)
    width = 2 * seq_len + int(bool(bos))
    if limit is not None and width > limit:
        raise ValueError(f"rows of {width} tokens exceed the context of {limit}; lower seq_len")
    vocab = torch.tensor(word_tokens(tok))
    if len(vocab) < seq_len:
        raise ValueError(f"only {len(vocab)} word tokens; lower seq_len")
    g = torch.Generator().manual_seed(seed)
    seqs = torch.stack([vocab[torch.randperm(len(vocab), generator=g)[:seq_len]] for _ in range(n_prompts)])
    rows = torch.cat([seqs, seqs], dim=1)
    if bos:
        rows = torch.cat([torch.full((n_prompts, 1), tok.bos_token_id), rows], dim=1)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    start = int(bool(bos)) + seq_len
    mask[:, start + 1:] = True
    data = TaskDataset.from_tokens(rows, mask, tok.pad_token_id if tok.pad_token_id is not None else 0, "induction")
    data.row_meta["repeat_start"] = [start] * n_prompts
    data.meta["seq_len"] = seq_len
    return data.split(val_fraction, seed)
