"""Task data: token ids, a loss mask and right padding.

Convention: ``loss_mask[i, t]`` is True when token ``t`` of row ``i`` is a target, predicted from
tokens ``< t``. Rows are right-padded with ``pad_token_id``; padding is never a target, and with
causal attention it never changes the positions before it.

Example::

    data = TaskDataset.from_prompts(model, ["The capital of France is"], [" Paris"])
    train, val = data.split(0.2, seed=0)
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from . import checks, models


@dataclass
class TaskDataset:
    """Right-padded token ids with a loss mask; see the module docstring for the convention."""

    tokens: Int[Tensor, "rows pos"]
    loss_mask: Bool[Tensor, "rows pos"]
    lengths: Int[Tensor, "rows"]
    pad_token_id: int = 0
    name: str = "custom"
    prompts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    row_meta: dict[str, list] = field(default_factory=dict)
    """Per-row annotations (answer ids, orders, ...); :meth:`subset` keeps them aligned with rows."""

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_tokens(
        cls,
        tokens: Int[Tensor, "rows pos"] | Sequence[Sequence[int]],
        loss_mask: Bool[Tensor, "rows pos"] | Sequence[Sequence[bool]],
        pad_token_id: int = 0,
        name: str = "custom",
        lengths: Sequence[int] | Tensor | None = None,
    ) -> "TaskDataset":
        """From token ids and a loss mask of the same shape (tensors, or ragged lists of rows).

        Tensors are taken as right-padded with ``pad_token_id``: unless ``lengths`` is given, a row
        ends at its last target or its last non-pad token, whichever comes later.

        Example::

            TaskDataset.from_tokens([[1, 5, 6, 7]], [[False, False, False, True]])
        """
        if isinstance(tokens, Tensor):
            checks.token_ids("tokens", tokens)
            if not isinstance(loss_mask, Tensor) or tuple(loss_mask.shape) != tuple(tokens.shape):
                got = tuple(loss_mask.shape) if isinstance(loss_mask, Tensor) else type(loss_mask).__name__
                raise ValueError(f"loss_mask must be a tensor shaped like tokens {tuple(tokens.shape)}; got {got}")
            if tokens.ndim != 2:
                raise ValueError(f"tokens must be [rows, pos]; got shape {tuple(tokens.shape)}")
            if lengths is None:  # right padding: a row ends after its last target or last non-pad token
                pos = torch.arange(1, tokens.shape[1] + 1)
                lengths = torch.maximum((pos * loss_mask.bool()).amax(dim=1), (pos * (tokens != pad_token_id)).amax(dim=1))
            return cls(tokens.long(), loss_mask.bool(), torch.as_tensor(lengths).long(), pad_token_id, name)
        rows, masks = list(tokens), list(loss_mask)
        if len(rows) != len(masks):
            raise ValueError(f"{len(rows)} token rows but {len(masks)} loss-mask rows")
        for i, (r, m) in enumerate(zip(rows, masks)):
            if len(r) != len(m):
                raise ValueError(f"row {i}: {len(r)} tokens but {len(m)} loss-mask entries")
            bad = [(j, t) for j, t in enumerate(r) if isinstance(t, bool) or not isinstance(t, numbers.Integral)
                   and not (isinstance(t, Tensor) and t.ndim == 0 and not t.is_floating_point())]
            if bad:
                j, t = bad[0]
                raise ValueError(f"row {i}, position {j}: token id {t!r} is not an integer; token ids must be "
                                 "whole numbers (a float id would be truncated silently)")
        return cls(*_pad(rows, masks, pad_token_id), pad_token_id, name)

    @classmethod
    def from_prompts(
        cls,
        model_or_tokenizer: Any,
        prompts: Sequence[str],
        targets: Sequence[str],
        prepend_bos: bool | None = None,
        max_length: int | None = None,
        name: str = "custom",
    ) -> "TaskDataset":
        """Prompt then target; the loss is on the target tokens only.

        ``prepend_bos``: None keeps what the tokenizer itself does; True makes every row start with
        exactly one BOS; False strips it. Prompt and target are tokenized separately, so the target
        tokens are exactly those of ``target`` (put the leading space in the target: ``" Paris"``).

        Example::

            TaskDataset.from_prompts(model, ["1, 2, 3,"], [" 4"])
        """
        tok = _tokenizer_of(model_or_tokenizer)
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if len(prompts) == 0:
            raise ValueError("no prompts given: a task needs at least one prompt/target pair")
        if tok.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set one first, e.g. "
                "tokenizer.pad_token = tokenizer.eos_token"
            )
        limit = max_length or (models.n_ctx(model_or_tokenizer) if models.is_tl_model(model_or_tokenizer) else None)
        bos = tok.bos_token_id
        if prepend_bos and bos is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        rows, masks = [], []
        for i, (p, t) in enumerate(zip(prompts, targets)):
            p_ids = list(tok(p, add_special_tokens=True)["input_ids"])
            t_ids = list(tok(t, add_special_tokens=False)["input_ids"])
            if prepend_bos is True and (not p_ids or p_ids[0] != bos):
                p_ids = [bos] + p_ids
            elif prepend_bos is False and p_ids and p_ids[0] == bos:
                p_ids = p_ids[1:]
            if not t_ids:
                raise ValueError(f"row {i}: target {t!r} has no tokens")
            if not p_ids:
                raise ValueError(f"row {i}: prompt {p!r} has no tokens; a target needs a context")
            if limit is not None and len(p_ids) + len(t_ids) > limit:
                raise ValueError(
                    f"row {i}: prompt + target is {len(p_ids) + len(t_ids)} tokens, longer than the "
                    f"model's context of {limit}; shorten it or drop the row"
                )
            rows.append(p_ids + t_ids)
            masks.append([False] * len(p_ids) + [True] * len(t_ids))
        data = cls(*_pad(rows, masks, tok.pad_token_id), tok.pad_token_id, name,
                   prompts=[p + t for p, t in zip(prompts, targets)])
        return data

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ``ValueError`` with what to fix; called on construction."""
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0 or self.tokens.shape[1] == 0:
            raise ValueError(f"empty data: tokens have shape {tuple(self.tokens.shape)}; give at least one row")
        checks.token_ids("tokens", self.tokens)
        if self.loss_mask.shape != self.tokens.shape:
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} must match tokens {tuple(self.tokens.shape)}")
        if self.lengths.shape != (self.tokens.shape[0],):
            raise ValueError(f"lengths must have one entry per row ({self.tokens.shape[0]})")
        if bool(self.loss_mask[:, 0].any()):
            raise ValueError("loss_mask[:, 0] is True somewhere: the first token has no context to be predicted from")
        pos = torch.arange(self.tokens.shape[1])
        if bool((self.loss_mask & (pos[None, :] >= self.lengths[:, None])).any()):
            raise ValueError("loss_mask marks padding as a target; targets must lie inside each row's length")
        empty = (~self.loss_mask.any(dim=1)).nonzero().flatten()
        if len(empty):
            raise ValueError(f"{len(empty)} row(s) have no target token (first: row {int(empty[0])}); every row needs one")
        if self.prompts is not None and len(self.prompts) != len(self):
            raise ValueError("prompts must have one entry per row")
        for k, v in self.row_meta.items():
            if len(v) != len(self):
                raise ValueError(f"row_meta['{k}'] has {len(v)} entries for {len(self)} rows")

    def check_model(self, model) -> None:
        """Raise before any work if the rows do not fit ``model``."""
        limit = models.n_ctx(model)
        if limit is not None and self.tokens.shape[1] > limit:
            raise ValueError(
                f"rows are up to {self.tokens.shape[1]} tokens but the model's context is {limit}; "
                "truncate or drop the long rows"
            )
        checks.token_ids("tokens", self.tokens, int(model.cfg.d_vocab))

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_targets(self) -> Int[Tensor, "rows"]:
        return self.loss_mask.sum(dim=1)

    def subset(self, index: Tensor | Sequence[int]) -> "TaskDataset":
        """Rows ``index`` in that order, trimmed to the longest remaining row."""
        index = torch.as_tensor(index, dtype=torch.long)
        width = int(self.lengths[index].max()) if len(index) else 1
        return TaskDataset(
            self.tokens[index, :width].clone(), self.loss_mask[index, :width].clone(),
            self.lengths[index].clone(), self.pad_token_id, self.name,
            [self.prompts[i] for i in index.tolist()] if self.prompts is not None else None,
            dict(self.meta),
            {k: [v[i] for i in index.tolist()] for k, v in self.row_meta.items()},
        )

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> "TaskSplits":
        """Shuffle with ``seed`` and split into disjoint train and validation sets."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
        if len(self) < 2:
            raise ValueError("need at least two rows to split")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_val = min(max(1, round(len(self) * val_fraction)), len(self) - 1)
        return TaskSplits(self.subset(perm[n_val:]), self.subset(perm[:n_val]))

    def fingerprint(self) -> str:
        """A short hash of the tokens and mask, to tell whether a checkpoint belongs to this data."""
        h = hashlib.sha256()
        h.update(self.tokens.numpy().tobytes())
        h.update(self.loss_mask.numpy().tobytes())
        return h.hexdigest()[:16]

    def to_frame(self, tokenizer=None):
        """One row per example: prompt text (when known), length and number of targets."""
        import pandas as pd

        frame = pd.DataFrame({"length": self.lengths.tolist(), "n_targets": self.n_targets.tolist()})
        if self.prompts is not None:
            frame.insert(0, "text", self.prompts)
        elif tokenizer is not None:
            frame.insert(0, "text", [tokenizer.decode(r[:n]) for r, n in zip(self.tokens.tolist(), self.lengths.tolist())])
        return frame


class TaskSplits(NamedTuple):
    """A task's train and validation :class:`TaskDataset`."""

    train: TaskDataset
    validation: TaskDataset


def first_target_position(loss_mask: Bool[Tensor, "rows pos"]) -> Int[Tensor, "rows"]:
    """Per row, the position that predicts its first target token (the prompt's last token)::

        first_target_position(torch.tensor([[False, False, True, True]]))   # tensor([1])
    """
    return loss_mask[:, 1:].to(torch.long).argmax(dim=1)


def concat(datasets: Sequence[TaskDataset], name: str | None = None) -> TaskDataset:
    """Rows of several data sets (same tokenizer and pad id) in order, right-padded to one width.

    ``prompts`` are kept when every part has them; ``row_meta`` keys present in every part, and
    ``meta`` entries equal in every part, are kept.

    Example::

        both = concat([antonym_train, capitalize_train], name="two_tasks")
    """
    parts = list(datasets)
    if not parts:
        raise ValueError("concat needs at least one TaskDataset")
    pads = {d.pad_token_id for d in parts}
    if len(pads) != 1:
        raise ValueError(f"data sets have different pad ids {sorted(pads)}: build them with the same tokenizer")
    width = max(int(d.tokens.shape[1]) for d in parts)
    pad = parts[0].pad_token_id
    grow = lambda t, fill: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)
    tokens = torch.cat([grow(d.tokens, pad) for d in parts])
    mask = torch.cat([grow(d.loss_mask, False) for d in parts])
    prompts = None if any(d.prompts is None for d in parts) else [p for d in parts for p in d.prompts]
    keys = set.intersection(*(set(d.row_meta) for d in parts))
    row_meta = {k: [v for d in parts for v in d.row_meta[k]] for k in sorted(keys)}
    meta = {k: v for k, v in parts[0].meta.items() if all(k in d.meta and d.meta[k] == v for d in parts[1:])}
    meta.update(parts=[d.name for d in parts], part_sizes=[len(d) for d in parts])
    return TaskDataset(tokens, mask, torch.cat([d.lengths for d in parts]), pad,
                       name or "+".join(d.name for d in parts), prompts, meta, row_meta)


def _pad(rows, masks, pad_token_id):
    if not rows:
        raise ValueError("empty data: give at least one row")
    width = max(len(r) for r in rows)
    if width == 0:
        raise ValueError("empty data: every row has zero tokens")
    tokens = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(m)] = torch.as_tensor(m, dtype=torch.bool)
    lengths = torch.as_tensor([len(r) for r in rows], dtype=torch.long)
    return tokens, mask, lengths


def _tokenizer_of(obj):
    if models.is_tl_model(obj):
        return models.tokenizer(obj)
    if hasattr(obj, "encode") or callable(obj):
        return obj
    raise TypeError(f"expected a TransformerLens model or a tokenizer; got {type(obj).__name__}")
