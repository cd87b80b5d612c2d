"""Diagnostic probes: standard synthetic inputs with a known answer, scored per head.

The probe input is a batch of *repeated random token sequences*: ``[BOS] x_1 .. x_L x_1 .. x_L``
with ``x`` drawn uniformly from the non-special vocabulary (without replacement when the
vocabulary is large enough, so the only repeats are the second copy). On it, per head, with ``A``
the attention pattern and ``s`` the first position of the first copy (1 with a BOS token, else 0):

- ``induction``: mean attention from each token of the second copy to the token *after* its
  earlier occurrence, ``A[q, q - L + 1]`` for ``q`` in the second copy. This is the induction score of
  Olsson et al. 2022, "In-context Learning and Induction Heads" (Anthropic), as the TransformerLens
  tutorials compute it (``pattern.diagonal(-seq_len + 1)`` on repeated random tokens; ARENA 1.2).
- ``duplicate_token``: mean attention from each token of the second copy to its earlier occurrence,
  ``A[q, q - L]``: the duplicate-token heads of Wang et al. 2022, "Interpretability in the Wild" (IOI),
  as in TransformerLens' ``head_detector`` ("duplicate_token_head").
- ``previous_token``: mean attention to the previous token, ``A[q, q - 1]`` for ``q >= s + 1`` (the
  previous-token heads of Olsson et al. 2022 / Elhage et al. 2021; TransformerLens'
  ``head_detector`` "previous_token_head").
- ``current_token``: mean attention of each token to itself, ``A[q, q]`` (``head_detector``
  "current_token_head").
- ``first_token``: the *sink share*, mean attention to position 0 over ``q >= 1`` (the attention
  sink of Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"): the head's
  resting state, not a pattern that competes with the others.

All scores lie in [0, 1]; chance for a single source position at query ``q`` is ``1 / (q + 1)``.

Example::

    probes = probe_scores(model, heads=[(1, 0), (1, 1)], n_sequences=10, length=50)
    probes.set_index(["layer", "head"]).loc[(1, 0), "induction"]    # e.g. 0.93
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import models, store

PROBES = ("induction", "duplicate_token", "previous_token", "current_token", "first_token")
PROBE_TEXT = {"induction": "induction", "duplicate_token": "duplicate-token", "previous_token": "previous-token",
              "current_token": "current-token", "first_token": "first-token (sink) share"}
REFERENCES = {
    "induction": "Olsson et al. 2022 (In-context Learning and Induction Heads); TransformerLens/ARENA induction score",
    "duplicate_token": "Wang et al. 2022 (Interpretability in the Wild, IOI); TransformerLens head_detector",
    "previous_token": "Olsson et al. 2022; Elhage et al. 2021; TransformerLens head_detector",
    "current_token": "TransformerLens head_detector (current_token_head)",
    "first_token": "Xiao et al. 2023 (Efficient Streaming Language Models with Attention Sinks)",
}
META_KEY = b"chg_lens.explain.probes"


def numpy_rng(seed: int) -> np.random.Generator:
    """A numpy generator for any whole ``seed``, negative ones included (as every other chg_lens seed;
    numpy itself refuses them): seeds 0, 1, ... give numpy's own streams."""
    return np.random.default_rng(int(seed) % 2**64)


def probe_tokens(tokenizer, n_sequences: int = 10, length: int = 50, seed: int = 0
                 ) -> tuple[Int[Tensor, "batch pos"], int]:
    """Repeated random token sequences ``[BOS] x x`` (``[batch, offset + 2 * length]``) and the offset
    (1 with a BOS token, else 0). Tokens are drawn from the non-special vocabulary."""
    if n_sequences < 1 or length < 3:
        raise ValueError("probes need n_sequences >= 1 and length >= 3")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    if len(vocab) < 2:
        raise ValueError("the tokenizer has fewer than 2 ordinary tokens: no probe sequences can be drawn")
    rng = numpy_rng(seed)
    pool = np.asarray(vocab)
    rows = [rng.choice(pool, size=length, replace=len(pool) < length) for _ in range(n_sequences)]
    body = torch.tensor(np.stack(rows), dtype=torch.long)
    bos = getattr(tokenizer, "bos_token_id", None)
    parts = ([torch.full((n_sequences, 1), int(bos), dtype=torch.long)] if bos is not None else []) + [body, body]
    return torch.cat(parts, 1), 1 if bos is not None else 0


def scores_from_pattern(pattern: Float[Tensor, "batch head q k"], offset: int, length: int
                        ) -> dict[str, Float[Tensor, " head"]]:
    """The probe scores of every head from its attention pattern on :func:`probe_tokens`."""
    L, s = length, offset
    q2 = torch.arange(s + L, s + 2 * L)                       # queries in the second copy
    q_prev = torch.arange(max(s + 1, 1), s + 2 * L)
    q_all = torch.arange(1, s + 2 * L)
    at = lambda q, k: pattern[:, :, q, k].mean(dim=(0, 2))
    return {"induction": at(q2, q2 - L + 1), "duplicate_token": at(q2, q2 - L),
            "previous_token": at(q_prev, q_prev - 1), "current_token": at(q_all, q_all),
            "first_token": at(q_all, torch.zeros_like(q_all))}


def probe_scores(model, heads: Sequence[tuple[int, int]] | None = None, *, n_sequences: int = 10,
                 length: int = 50, seed: int = 0) -> pd.DataFrame:
    """Probe scores (columns :data:`PROBES`) of ``heads`` (default: all), one row per head.

    ``length`` is cut to fit the model's context. Read-only hooks, no gradients, one batch.

        probe_scores(model, [(0, 0), (1, 0)]).columns.tolist()
        # ['layer', 'head', 'induction', 'duplicate_token', 'previous_token', 'current_token', 'first_token']
    """
    model = models.as_model(model)
    L, H = models.n_layers(model), models.n_heads(model)
    heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else [(int(l), int(h)) for l, h in heads]
    ctx = models.n_ctx(model)
    tok = models.tokenizer(model)
    has_bos = getattr(tok, "bos_token_id", None) is not None
    if ctx:
        length = min(length, (ctx - int(has_bos)) // 2)
    tokens, offset = probe_tokens(tok, n_sequences, length, seed)
    layers = sorted({l for l, _ in heads})
    store: dict[int, Tensor] = {}

    def reader(layer: int):
        def hook(x, hook):  # read only
            store[layer] = x.detach().float().cpu()
        return hook

    with models.frozen(model), torch.no_grad():
        models.run_until_layer(model, tokens.to(models.device(model)),
                               [(models.pattern_hook_name(l), reader(l)) for l in layers], layers[-1])
    per_layer = {l: scores_from_pattern(store[l], offset, length) for l in layers}
    rows = [{"layer": l, "head": h, **{p: float(per_layer[l][p][h]) for p in PROBES}} for l, h in heads]
    frame = pd.DataFrame(rows, columns=["layer", "head", *PROBES])
    frame.attrs["probe"] = {"n_sequences": n_sequences, "length": length, "seed": seed, "bos": has_bos,
                            "references": REFERENCES}
    return frame


def write_probes(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``probes.parquet`` (settings and references in the file's metadata), atomically."""
    path = Path(path)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(frame.attrs.get("probe", {}), sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    return store.write_file(path, lambda tmp: pq.write_table(table, tmp))


def load_probes(path: str | os.PathLike) -> pd.DataFrame | None:
    """``probes.parquet`` back as a DataFrame (settings in ``.attrs["probe"]``); None if it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    table = pq.read_table(path)
    frame = table.to_pandas()
    md = table.schema.metadata or {}
    frame.attrs["probe"] = json.loads(md[META_KEY]) if META_KEY in md else {}
    return frame


def probe_lookup(frame: pd.DataFrame | None) -> dict[tuple[int, int], dict[str, float]]:
    """``{(layer, head): {probe: score}}`` (empty without probes)."""
    if frame is None:
        return {}
    return {(int(r["layer"]), int(r["head"])): {p: float(r[p]) for p in PROBES if p in r}
            for r in frame.to_dict("records")}


def describe(scores: dict[str, float] | None, names: Sequence[str] = PROBES) -> str:
    """``"induction 0.85, previous-token 0.02, ..."`` for a prompt or report."""
    if not scores:
        return "not recorded"
    return ", ".join(f"{PROBE_TEXT[p]} {scores[p]:.2f}" for p in names if p in scores)


__all__ = ["PROBES", "REFERENCES", "describe", "load_probes", "probe_lookup", "probe_scores", "probe_tokens",
           "scores_from_pattern", "write_probes"]
