"""Record what chosen attention heads do on text windows (read-only hooks, no gradients).

For every head and query token: the norm of the head's output ``||z_h @ W_O[l, h]||``, the
attention pattern's top source positions with their weights, and the exact attention *mass* on
each standard pattern's source positions, computed from the full pattern at record time
(:func:`pattern_masks`: first token, previous token, current token, earlier occurrences of the
current token (duplicate), the tokens after them (induction), 2-4 tokens back), stored as
float16 columns ``m_<pattern>``. ``hook_z`` and ``hook_pattern`` are only read, never changed. The recording is streamed to ``raw_events.parquet`` (one row per window,
query position and head) with the token strings it needs in the file's metadata, so later steps
need neither the model nor its tokenizer.

Example::

    heads = select_heads(model, max_heads=20)
    record_to_parquet(model, windows, heads, "out/raw_events.parquet")
    raw = load_raw("out/raw_events.parquet")
    raw.activity.shape    # (n_heads, n_windows, window_len)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .. import models, store
from ..scoring import parse_heads  # noqa: F401  (re-exported: "L.H" head lists live in the scoring engine)
from .sources import Windows

META_KEY = b"chg_lens.explain"
OFFSETS = (2, 3, 4)
MASS_PATTERNS = ("first_token", "previous_token", "current_token", "duplicate_token", "induction") + tuple(
    f"offset_{k}" for k in OFFSETS)
PROBES_FILE = "probes.parquet"


def pattern_masks(tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """For each pattern of :data:`MASS_PATTERNS`, which key positions are its sources, ``[batch, q, k]`` bool.

    Position 0 (the first token, the attention sink) is a source only of ``first_token``: every
    other pattern leaves it out, so resting on the first token never counts as a pattern.

    - first_token: ``k == 0`` (for ``q >= 1``); previous_token: ``k == q - 1``; current_token: ``k == q``
      (``q >= 1``); offset_o: ``k == q - o``;
    - duplicate_token: every earlier occurrence of the current token, ``k < q`` with ``tok[k] == tok[q]``;
    - induction: every token after an earlier occurrence, ``k <= q - 1`` with ``tok[k - 1] == tok[q]``.
    """
    b, T = tokens.shape
    q = torch.arange(T, device=tokens.device)[:, None]
    k = torch.arange(T, device=tokens.device)[None, :]
    not_sink = k >= 1
    same = tokens[:, :, None] == tokens[:, None, :]                       # [b, q, k]: tok[q] == tok[k]
    after_same = torch.zeros_like(same)
    after_same[:, :, 1:] = same[:, :, :-1]                                # tok[q] == tok[k - 1]
    out = {"first_token": ((k == 0) & (q >= 1)).expand(b, T, T),
           "previous_token": ((k == q - 1) & not_sink).expand(b, T, T),
           "current_token": ((k == q) & not_sink).expand(b, T, T),
           "duplicate_token": same & (k < q) & not_sink,
           "induction": after_same & (k <= q - 1) & (k >= 2)}
    for o in OFFSETS:
        out[f"offset_{o}"] = ((k == q - o) & not_sink).expand(b, T, T)
    return out


def repeated_phrase(tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """``[batch, q]`` bool: the current token and the one before it occurred together earlier
    (``tok[k-1] == tok[q]`` and ``tok[k-2] == tok[q-1]`` for some ``3 <= k <= q - 1``): a repeated
    phrase, where an induction head (prefix matching, Olsson et al. 2022) has the clearest target."""
    b, T = tokens.shape
    q = torch.arange(T, device=tokens.device)[:, None]
    k = torch.arange(T, device=tokens.device)[None, :]
    same = tokens[:, :, None] == tokens[:, None, :]
    after = torch.zeros_like(same)
    after[:, :, 1:] = same[:, :, :-1]                                     # tok[q] == tok[k - 1]
    prev = torch.zeros_like(same)
    prev[:, 1:, 2:] = same[:, :-1, :-2]                                   # tok[q - 1] == tok[k - 2]
    return (after & prev & (k >= 3) & (k <= q - 1)).any(-1)


def pattern_counts(tokens: np.ndarray, chunk: int = 128) -> dict[str, np.ndarray]:
    """Number of source positions of each pattern per query, ``[W, T]`` int (0: the pattern does not apply);
    and under ``"repeated_phrase"`` the :func:`repeated_phrase` positions (0/1)."""
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    parts: dict[str, list] = {p: [] for p in (*MASS_PATTERNS, "repeated_phrase")}
    for i in range(0, t.shape[0], chunk):
        for p, m in pattern_masks(t[i:i + chunk]).items():
            parts[p].append(m.sum(-1).numpy())
        parts["repeated_phrase"].append(repeated_phrase(t[i:i + chunk]).long().numpy())
    return {p: np.concatenate(v) if v else np.zeros((0, t.shape[1]), dtype=np.int64) for p, v in parts.items()}


def select_heads(model, heads: Sequence[tuple[int, int]] | None = None, max_heads: int | None = None,
                 seed: int = 0) -> list[tuple[int, int]]:
    """The heads to record: ``heads`` if given (checked), else all heads; more than ``max_heads``
    are cut to a random sample (``seed``), sorted by layer and head.

        select_heads(model, max_heads=3)   # e.g. [(0, 2), (1, 0), (1, 3)]
    """
    L, H = models.n_layers(model), models.n_heads(model)
    if heads is None:
        chosen = [(l, h) for l in range(L) for h in range(H)]
    else:
        chosen = sorted(set((int(l), int(h)) for l, h in heads))
        bad = [(l, h) for l, h in chosen if not (0 <= l < L and 0 <= h < H)]
        if bad:
            raise ValueError(f"heads {bad} do not exist: the model has {L} layers x {H} heads")
    if max_heads is not None:
        if max_heads < 1:
            raise ValueError("max_heads must be at least 1")
        if len(chosen) > max_heads:
            chosen = sorted(random.Random(seed).sample(chosen, max_heads))
    return chosen


def head_activity(
    z: Float[Tensor, "batch pos head_index d_head"], W_O: Float[Tensor, "head_index d_head d_model"]
) -> Float[Tensor, "batch pos head_index"]:
    """Norm of each head's output per query token: ``||z[..., h, :] @ W_O[h]||``."""
    return torch.einsum("bphd,hdm->bphm", z, W_O.to(z.device, z.dtype)).norm(dim=-1)


def record_batch(model, tokens: Int[Tensor, "batch pos"], heads: Sequence[tuple[int, int]], top_sources: int = 3
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward pass (stopped after the last layer needed) with read-only hooks.

    Returns ``activity [batch, pos, n]``, ``sources [batch, pos, n, k]``, ``weights [batch, pos, n, k]``
    and ``masses [batch, pos, n, len(MASS_PATTERNS)]`` (attention mass on each pattern's sources) for
    the ``n`` heads in order.
    """
    layers = sorted({l for l, _ in heads})
    W_O = models.W_O(model)
    store: dict[tuple[str, int], Tensor] = {}

    def reader(kind: str, layer: int):
        def hook(x, hook):  # read only: returns None, so the activation is unchanged
            store[(kind, layer)] = x.detach()
        return hook

    hooks = [(models.z_hook_name(l), reader("z", l)) for l in layers]
    hooks += [(models.pattern_hook_name(l), reader("pattern", l)) for l in layers]
    with torch.no_grad():
        tokens = tokens.to(models.device(model))
        models.run_until_layer(model, tokens, hooks, layers[-1])
        by_pattern = pattern_masks(tokens)
        masks = torch.stack([by_pattern[p].float() for p in MASS_PATTERNS], 1)     # [batch, P, q, k]
        acts, srcs, wts, mass = [], [], [], []
        for l in layers:
            idx = [h for (ll, h) in heads if ll == l]
            z = store[("z", l)][:, :, idx].float()
            acts.append(head_activity(z, W_O[l, idx].float()))
            pattern = store[("pattern", l)][:, idx].float()          # [batch, n, q, k]
            k = min(top_sources, pattern.shape[-1])
            w, s = pattern.topk(k, dim=-1)
            srcs.append(s.permute(0, 2, 1, 3))
            wts.append(w.permute(0, 2, 1, 3))
            mass.append(torch.einsum("bnqk,bpqk->bqnp", pattern, masks.to(pattern.device)))
    return (torch.cat(acts, 2).float().cpu(), torch.cat(srcs, 2).cpu(), torch.cat(wts, 2).float().cpu(),
            torch.cat(mass, 2).float().cpu())


def record_to_parquet(
    model,
    windows: Windows,
    heads: Sequence[tuple[int, int]],
    path: str | os.PathLike,
    batch_size: int = 8,
    top_sources: int = 3,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    autocast: str | None = "off",
) -> Path:
    """Record ``heads`` on every window and write ``raw_events.parquet`` (streamed, one row group a batch).

    Columns: window, pos, token, layer, head, activity, src0..src{k-1}, w0..w{k-1} and the float16
    attention masses ``m_<pattern>`` of :data:`MASS_PATTERNS`. The file's
    metadata holds the heads, the windows' sources, the strings of the tokens that occur, ``meta``, and
    the precision of the recording passes (``autocast``, default ``"off"``, the model's own dtype; see
    :func:`chg_lens.models.resolve_autocast`; activities and weights are stored as float32).
    """
    model = models.as_model(model)
    heads = list(heads)
    if not heads:
        raise ValueError("no heads to record")
    tok = models.tokenizer(model)
    tokens = windows.tokens
    n_ctx = models.n_ctx(model)
    if n_ctx and tokens.shape[1] > n_ctx:
        raise ValueError(f"window_len {tokens.shape[1]} is longer than the model's context ({n_ctx}); use a shorter --window-len")
    ids = sorted(set(tokens.flatten().tolist()))
    token_str = {int(i): tok.decode([i]) for i in ids}
    autocast = models.resolve_autocast(model, autocast)
    info = dict(meta or {})
    info.update(**models.precision_meta(model, autocast), heads=[list(h) for h in heads],
                sources=list(windows.source), top_sources=top_sources,
                n_windows=int(tokens.shape[0]), window_len=int(tokens.shape[1]),
                bos_token_id=getattr(tok, "bos_token_id", None),
                token_str={str(k): v for k, v in token_str.items()})
    k = top_sources
    fields = [("window", pa.int32()), ("pos", pa.int32()), ("token", pa.int32()), ("layer", pa.int16()),
              ("head", pa.int16()), ("activity", pa.float32())]
    fields += [(f"src{i}", pa.int32()) for i in range(k)] + [(f"w{i}", pa.float32()) for i in range(k)]
    fields += [(f"m_{p}", pa.float16()) for p in MASS_PATTERNS]
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(info, sort_keys=True).encode()})
    n_heads = len(heads)
    layer_col = np.array([l for l, _ in heads], dtype=np.int16)
    head_col = np.array([h for _, h in heads], dtype=np.int16)

    def write(tmp: Path) -> None:  # streamed under a temporary name; store.write_file renames it into place
        with models.frozen(model), models.cast_weights_once(model, autocast), pq.ParquetWriter(tmp, schema) as writer:
            record_batches(writer)

    def record_batches(writer) -> None:
        bar = tqdm(range(0, tokens.shape[0], batch_size), desc="record heads", disable=not progress)
        for start in bar:
            batch = tokens[start:start + batch_size]
            with models.autocast(model, autocast):
                act, src, wt, mass = record_batch(model, batch, heads, top_sources)
            b, T = batch.shape
            if src.shape[-1] < k:  # windows shorter than k: pad with position 0, weight 0
                pad = k - src.shape[-1]
                src = torch.cat([src, torch.zeros(*src.shape[:-1], pad, dtype=src.dtype)], -1)
                wt = torch.cat([wt, torch.zeros(*wt.shape[:-1], pad)], -1)
            n = b * T * n_heads
            cols = {
                "window": np.repeat(np.arange(start, start + b, dtype=np.int32), T * n_heads),
                "pos": np.tile(np.repeat(np.arange(T, dtype=np.int32), n_heads), b),
                "token": np.repeat(batch.numpy().astype(np.int32).reshape(-1), n_heads),
                "layer": np.tile(layer_col, b * T), "head": np.tile(head_col, b * T),
                "activity": act.numpy().astype(np.float32).reshape(n),
            }
            for i in range(k):
                cols[f"src{i}"] = src[..., i].numpy().astype(np.int32).reshape(n)
                cols[f"w{i}"] = wt[..., i].numpy().astype(np.float32).reshape(n)
            for i, p in enumerate(MASS_PATTERNS):
                cols[f"m_{p}"] = mass[..., i].numpy().astype(np.float16).reshape(n)
            writer.write_table(pa.table(cols, schema=schema))

    return store.write_file(path, write)


@dataclass
class RawActivity:
    """``raw_events.parquet`` as arrays: head index ``i`` is ``heads[i]``."""

    tokens: np.ndarray            # [window, pos] int
    heads: list[tuple[int, int]]
    activity: np.ndarray          # [head, window, pos] float32
    sources: np.ndarray           # [head, window, pos, k] int
    weights: np.ndarray           # [head, window, pos, k] float32
    token_str: dict[int, str]
    meta: dict[str, Any] = field(default_factory=dict)
    masses: dict[str, np.ndarray] | None = None   # pattern -> [head, window, pos] float16 (None: older file)
    probes: Any = None                            # probes.parquet as a DataFrame (None: not recorded)

    def head_index(self, layer: int, head: int) -> int:
        return self.heads.index((layer, head))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata ``record_to_parquet`` stored in the file."""
    md = pq.read_schema(path).metadata or {}
    if META_KEY not in md:
        raise ValueError(f"{path} is not a raw_events.parquet written by chg_lens.explain")
    return json.loads(md[META_KEY])


def load_raw(path: str | os.PathLike) -> RawActivity:
    """Read ``raw_events.parquet`` back into arrays (exactly the values written), with the probe
    scores of ``probes.parquet`` beside it when that file exists."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run without --skip-cache first")
    meta = read_meta(path)
    table = pq.read_table(path)
    heads = [tuple(h) for h in meta["heads"]]
    W, T, k = meta["n_windows"], meta["window_len"], meta["top_sources"]
    H = len(heads)
    col = lambda name: table.column(name).to_numpy()
    window, pos = col("window"), col("pos")
    hid = {h: i for i, h in enumerate(heads)}
    # map each row's (layer, head) to its index through a lookup table
    lut = np.full((int(col("layer").max()) + 1, int(col("head").max()) + 1), -1, dtype=np.int64)
    for (l, h), i in hid.items():
        lut[l, h] = i
    row_head = lut[col("layer").astype(np.int64), col("head").astype(np.int64)]
    tokens = np.zeros((W, T), dtype=np.int64)
    tokens[window, pos] = col("token")
    activity = np.zeros((H, W, T), dtype=np.float32)
    activity[row_head, window, pos] = col("activity")
    sources = np.zeros((H, W, T, k), dtype=np.int64)
    weights = np.zeros((H, W, T, k), dtype=np.float32)
    for i in range(k):
        sources[row_head, window, pos, i] = col(f"src{i}")
        weights[row_head, window, pos, i] = col(f"w{i}")
    masses = None
    if all(f"m_{p}" in table.column_names for p in MASS_PATTERNS):
        masses = {}
        for p in MASS_PATTERNS:
            m = np.zeros((H, W, T), dtype=np.float16)
            m[row_head, window, pos] = col(f"m_{p}")
            masses[p] = m
    from .probes import load_probes

    token_str = {int(a): b for a, b in meta.pop("token_str").items()}
    return RawActivity(tokens=tokens, heads=heads, activity=activity, sources=sources, weights=weights,
                       token_str=token_str, meta=meta, masses=masses, probes=load_probes(path.with_name(PROBES_FILE)))
