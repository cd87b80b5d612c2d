"""The scoring engine: target log-probabilities of rows under gate configurations.

Every analysis in chg_lens (CHG fitting, contrastive CHG, ablation sweeps, patching, validation)
scores a model the same way: repeat a batch of rows once per gate configuration, run the blocks with
gate hooks on ``hook_z``, and unembed only the positions that predict target tokens. This module
holds that pass (:func:`row_logprobs`), the batched pass over many configurations with prefix reuse
(:func:`score_configs`; :func:`evaluate` is a call to it), the per-configuration metrics, ``"L.H"``
head lists and their checks, the position that predicts a row's first target, and the one ``z``
collector (:func:`collect_z`: mean ``z`` for mean ablation, per-row ``z`` for patching).

Checks at the edge, trust inside: each public function checks its inputs once and builds a
:class:`Context` (:func:`context`: the model as :func:`chg_lens.models.as_model` gives it, its shape
and device, every data set checked against it, the precision resolved once); the engine functions
(:func:`row_logprobs_unchecked`, ``_score_configs``, ``_collect_z``, ``_gate_gradients``) take that
context and re-check nothing. The analyses (patching, ablation, attribution, faithfulness) build
one context per call and call the engine; fits pass theirs to :func:`row_logprobs_unchecked` on
every update.

Example::

    out = row_logprobs(model, data.tokens, data.loss_mask, gates=configs)   # configs [K, L, H]
    out.logprob_sum.shape   # [K, rows]
    scores = score_configs(model, data, gates.single_head_configs(model))   # [n_heads_total, rows]
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import checks, models, runtime
from . import gates as gates_mod
from .deprecation import keyword_only, renamed
from .data import TaskDataset, first_target_position
from .models import Hook

Heads = Sequence[tuple[int, int]]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each precision :func:`chg_lens.models.resolve_autocast` can choose."""


@dataclass(frozen=True)
class Context:
    """What a public entry point has checked, once, for the engine functions that trust it.

    ``model`` is the checked TransformerLens model, ``n_layers`` / ``n_heads`` / ``d_vocab`` its
    shape, ``device`` where its inputs go, ``autocast`` the resolved precision (``"bf16"``,
    ``"fp16"`` or None, from :func:`chg_lens.models.resolve_autocast`). Build it with
    :func:`context`.

    Example::

        ctx = context(model, train, validation, autocast="auto")   # the checks, once
        row_logprobs_unchecked(ctx, train.tokens[:8], train.loss_mask[:8], gates)   # per update
    """

    model: Any
    n_layers: int
    n_heads: int
    d_vocab: int
    device: torch.device
    autocast: str | None

    def precision(self) -> contextlib.AbstractContextManager:
        """The autocast region of a pass (what :func:`chg_lens.models.autocast` enters for
        ``self.autocast``, without resolving it again)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])

    def cast_weights(self) -> contextlib.AbstractContextManager:
        """:func:`chg_lens.models.cast_weights_once` for this precision (nothing under None)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return models.cast_weights_once(self.model, self.autocast)

    @functools.cached_property
    def precision_meta(self) -> dict[str, Any]:
        """What results record: ``{"autocast", "precision"}`` (:func:`chg_lens.models.precision_meta`)."""
        return {"autocast": self.autocast, "precision": models.describe_precision(self.model, self.autocast)}


def context(model, *data: TaskDataset | None, autocast: str | None = "off") -> Context:
    """Check ``model`` (a model object or a name, :func:`chg_lens.models.as_model`) and each data
    set against it (None skipped), resolve ``autocast`` once, and return the :class:`Context` the
    engine functions trust. Every error is raised here, before any work.

    Example::

        ctx = context("smollm2-135m-instruct", clean, corrupted, autocast="off")
        ctx.n_layers, ctx.n_heads, ctx.autocast      # (30, 9, None)
    """
    model = models.as_model(model)
    for d in data:
        if d is not None:
            if not isinstance(d, TaskDataset):
                raise TypeError(f"data must be a TaskDataset; got {type(d).__name__}")
            d.check_model(model)
    return _context(model, autocast)


def _context(model, autocast: str | None) -> Context:
    """A context for a model already checked (no ``as_model``, no data): shape, device, precision."""
    return Context(model, models.n_layers(model), models.n_heads(model), int(model.cfg.d_vocab),
                   models.device(model), models.resolve_autocast(model, autocast))


@dataclass
class RowScores:
    """Per configuration and row: summed target log-prob, target count, all-targets-correct."""

    logprob_sum: Float[Tensor, "configs rows"]
    n_targets: Int[Tensor, "rows"]
    correct: Bool[Tensor, "configs rows"]
    answer_logits: Float[Tensor, "configs rows answers"] | None = None
    """Logits of each row's ``answers`` tokens at the position that predicts its first target
    (only when ``answers`` was given)."""

    @property
    def logit_diff(self) -> Float[Tensor, "configs rows"]:
        """Logit of the first answer minus the second (correct minus wrong, e.g. IO minus S)."""
        if self.answer_logits is None or self.answer_logits.shape[-1] < 2:
            raise ValueError("no answer logits: pass answers=[[correct_id, wrong_id], ...] per row")
        return self.answer_logits[..., 0] - self.answer_logits[..., 1]

    @property
    def logprob_mean(self) -> Float[Tensor, "configs rows"]:
        """Mean log-probability per target token of each row."""
        return self.logprob_sum / self.n_targets.to(self.logprob_sum.dtype)

    @property
    def nll(self) -> Float[Tensor, "configs"]:
        """The CHG objective: mean over rows of each row's mean target NLL."""
        return -self.logprob_mean.mean(dim=1)


def row_logprobs(
    model,
    tokens: Int[Tensor, "rows pos"],
    loss_mask: Bool[Tensor, "rows pos"],
    gates: Float[Tensor, "*configs layer head"] | None = None,
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    extra_hooks: Sequence[Hook] = (),
    answers: Int[Tensor, "rows answers"] | None = None,
    start_at_layer: int | None = None,
    resid: Float[Tensor, "rows pos d_model"] | None = None,
    autocast: str | None = "off",
    per_row: bool = False,
) -> RowScores:
    """Score ``rows`` under each gate configuration in one forward pass (differentiable in ``gates``).

    ``tokens`` are right-padded; the pass is trimmed to the longest row that has a target. Only the
    positions that predict a target are unembedded. ``extra_hooks`` (your own TransformerLens hooks)
    run in the same pass after the gates. With ``answers`` (token ids per row, e.g. ``[correct,
    wrong]``) the result also holds their logits at the position predicting the first target.

    Prefix reuse: with ``start_at_layer=k`` and ``resid`` (the residual entering block ``k`` for one
    block of rows, from :func:`chg_lens.models.residual_at`), the pass starts at block ``k``; the
    caller guarantees that every configuration's gates below ``k`` equal those ``resid`` was
    computed with.

    ``autocast`` sets the precision of the pass and the unembedding: ``"off"`` (the default of
    every measurement: the model's own dtype, the numbers TransformerLens and Hugging Face give, the
    same on every machine), ``"auto"`` (bf16 where it pays, see
    :func:`chg_lens.models.resolve_autocast`; what fits use), ``"bf16"`` or ``"fp16"``; gates and
    log-softmax are always float32.

    ``per_row=True``: ``gates`` is ``[rows, n_layers, n_heads]``, one configuration per row (row
    ``i`` runs under ``gates[i]``, the rows are not repeated), and the result is ``[1, rows]``; per-row
    ``sources`` and ``positions`` are taken row by row. This is the pass of :func:`gate_gradients`.
    """
    ctx = _context(model, autocast)  # the precision resolved once; the model is used as given
    if per_row and (gates is None or gates.ndim != 3 or gates.shape[0] != tokens.shape[0]):
        raise ValueError(f"per_row needs gates [rows={tokens.shape[0]}, n_layers, n_heads]; got "
                         f"{None if gates is None else tuple(gates.shape)}")
    if gates is not None:
        gates = gates_mod.as_config_gates(gates, ctx.n_layers, ctx.n_heads)
    if answers is not None:
        answers = torch.as_tensor(answers).long()
        if answers.ndim != 2 or answers.shape[0] != tokens.shape[0]:
            raise ValueError(f"answers must be [rows, n_answers] with {tokens.shape[0]} rows; got {tuple(answers.shape)}")
    if start_at_layer is not None and resid is None:
        raise ValueError("start_at_layer needs resid, the residual entering that block")
    return row_logprobs_unchecked(ctx, tokens, loss_mask, gates, sources, positions, extra_hooks, answers,
                                  start_at_layer, resid, per_row)


def row_logprobs_unchecked(
    ctx: Context,
    tokens: Int[Tensor, "rows pos"],
    loss_mask: Bool[Tensor, "rows pos"],
    gates: Float[Tensor, "*configs layer head"] | None = None,
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    extra_hooks: Sequence[Hook] = (),
    answers: Int[Tensor, "rows answers"] | None = None,
    start_at_layer: int | None = None,
    resid: Float[Tensor, "rows pos d_model"] | None = None,
    per_row: bool = False,
) -> RowScores:
    """:func:`row_logprobs` on a checked :class:`Context`, checking nothing: the pass a fit runs
    on every update, and the engine under every measurement. The caller guarantees what
    :func:`row_logprobs` checks: ``gates`` ``[n_layers, n_heads]`` or ``[configs, n_layers,
    n_heads]`` of the context's model (``[rows, ...]`` with ``per_row``), ``answers``
    ``[rows, n_answers]``, ``resid`` with ``start_at_layer``. The precision is ``ctx.autocast``.

    Example::

        ctx = context(model, data, autocast="auto")          # once, before the loop
        out = row_logprobs_unchecked(ctx, data.tokens[rows], data.loss_mask[rows], gates)
        out.nll.backward()
    """
    width = int(loss_mask.any(dim=0).nonzero().max()) + 1
    tokens, loss_mask = tokens[:, :width], loss_mask[:, :width]
    dev = ctx.device
    tokens = tokens.to(dev)
    loss_mask = loss_mask.to(dev)
    if positions is not None:
        positions = positions[:, :width].to(dev)
    hooks: list[Hook] = []
    n_cfg = 1
    if gates is not None:
        cfg_gates = gates if gates.ndim == 3 else gates.unsqueeze(0)
        n_cfg = 1 if per_row else cfg_gates.shape[0]
        if sources is not None:
            sources = {l: s[..., :width, :, :] if s.ndim >= 3 else s for l, s in sources.items()}
        hooks = gates_mod.layer_hooks(cfg_gates.to(dev), sources, positions)
    hooks.extend(extra_hooks)

    n_rows = tokens.shape[0]
    rows, pred_pos = loss_mask[:, 1:].nonzero(as_tuple=True)  # target at pos+1, predicted from pos
    targets = tokens[rows, pred_pos + 1]
    batch = tokens.repeat(n_cfg, 1) if n_cfg > 1 else tokens
    select = [(rows, pred_pos)]
    if answers is not None:
        answers = torch.as_tensor(answers, device=dev).long()
        select.append((torch.arange(n_rows, device=dev), first_target_position(loss_mask)))
    start = None
    if start_at_layer is not None:
        start = resid[:, :width].to(dev)
        start = start.repeat(n_cfg, 1, 1) if n_cfg > 1 else start
    # Target and answer logits come from the one output path (models.logits_at -> models.unembed).
    with ctx.precision():
        out = models.logits_at(ctx.model, None if start is not None else batch, select, hooks,
                               start_at_layer=start_at_layer if start is not None else None, resid=start, lead=n_cfg)
    logits = out[0].float()  # [K, N, d_vocab]
    answer_logits = None
    if answers is not None:
        answer_logits = out[1].float().gather(-1, answers.to(out[1].device).expand(n_cfg, -1, -1)).contiguous()
    targets = targets.to(logits.device)
    target_logit = logits.gather(-1, targets.expand(n_cfg, -1).unsqueeze(-1)).squeeze(-1)
    logprob = target_logit - logits.logsumexp(dim=-1)
    hit = (logits.argmax(dim=-1) == targets).to(torch.long)

    out_dev, rows = logits.device, rows.to(logits.device)  # the last layer's device on a split model
    logprob_sum = torch.zeros(n_cfg, n_rows, dtype=logprob.dtype, device=out_dev).index_add(1, rows, logprob)
    n_hit = torch.zeros(n_cfg, n_rows, dtype=torch.long, device=out_dev).index_add(1, rows, hit)
    n_targets = loss_mask.sum(dim=1).to(out_dev)
    return RowScores(logprob_sum, n_targets, n_hit == n_targets, answer_logits)


@keyword_only("batch_size", "rows_per_pass", "progress", "desc", "autocast")
@renamed(max_rows_per_pass="rows_per_pass")
@torch.no_grad()
def evaluate(
    model,
    data: TaskDataset,
    gates: Float[Tensor, "*configs layer head"] | None = None,
    *,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    desc: str = "evaluate",
    autocast: str | None = "off",
) -> RowScores:
    """Score every row of ``data`` under each configuration in ``gates`` (None = ungated).

    Configurations are batched into the same pass, ``rows_per_pass`` rows (configurations x
    rows) at a time. Returns :class:`RowScores` with ``[n_configs, len(data)]`` tensors on the CPU.
    ``autocast`` sets the precision (default ``"off"``: the model's own dtype; see :func:`row_logprobs`). This is
    :func:`score_configs` without answers or prefix reuse.

    Example::

        scores = evaluate(model, val, torch.stack([g_plus, g_minus]))
        scores.logprob_sum.mean(1), scores.correct.float().mean(1)
    """
    ctx = context(model, data, autocast=autocast)
    cfg, base, _, _ = _check_configs(ctx, data, gates, None, None, "gates")
    return _score_configs(ctx, data, cfg, base=base, prefix_reuse=False, batch_size=batch_size,
                          rows_per_pass=rows_per_pass, progress=progress, desc=desc)


# --------------------------------------------------------------------------------------------
# Many configurations: the shared engine of fits' validation, sweeps and patching
# --------------------------------------------------------------------------------------------


def first_changed_layer(configs: Float[Tensor, "configs layer head"], base: Float[Tensor, "layer head"]) -> Tensor:
    """Per configuration, the lowest layer whose gates differ from ``base`` (n_layers if none)."""
    diff = (configs != base.to(configs.dtype)).any(dim=2)  # [K, L]
    L = configs.shape[1]
    idx = torch.where(diff, torch.arange(L).expand_as(diff), torch.full_like(diff, L, dtype=torch.long))
    return idx.min(dim=1).values


@keyword_only("base", "answers", "prefix_reuse", "batch_size", "rows_per_pass", "progress", "desc", "autocast")
@renamed(max_rows_per_pass="rows_per_pass")
@torch.no_grad()
def score_configs(
    model,
    data: TaskDataset,
    configs: Float[Tensor, "*configs layer head"] | None,
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    *,
    base: Float[Tensor, "layer head"] | None = None,
    answers: Any = "auto",
    prefix_reuse: bool = True,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    desc: str = "configs",
    autocast: str | None = "off",
) -> RowScores:
    """Score every row of ``data`` under each gate configuration; ``[n_configs, rows]`` on the CPU.

    ``sources`` (layer -> ``[rows, pos, head, d_head]`` per data row, or ``[head, d_head]``) and
    ``positions`` are passed to the gates (see :func:`chg_lens.gates.gate_z`). With
    ``prefix_reuse``, configurations are grouped by the lowest layer where they differ from
    ``base`` (default: all ones); the residual entering that layer is computed once per batch of
    rows under ``base`` and each group's pass starts there. ``answers``: ``"auto"`` uses
    ``data.row_meta["answers"]`` when present (their logits give the logit difference), None skips.
``configs=None`` scores the ungated model (one configuration, no gate hooks). Rows are taken
``batch_size`` at a time and configurations grouped so a pass holds at most ``rows_per_pass``
rows (configurations x rows); ``autocast`` as in :func:`row_logprobs` (default ``"off"``: exact in
the model's own dtype; ``"auto"``/``"bf16"`` trade accuracy for speed in large sweeps, see
docs/models.md; under autocast the weights are cast once for the whole call,
:func:`chg_lens.models.cast_weights_once`).

    Example::

        scores = score_configs(model, data, gates.single_head_configs(model))
        scores.logprob_sum.mean(1)     # [n_heads_total]
    """
    ctx = context(model, data, autocast=autocast)  # a bad autocast value fails here, before any work
    cfg, base, ans, positions = _check_configs(ctx, data, configs, base, answers, "configs", positions)
    return _score_configs(ctx, data, cfg, sources, positions, base=base, answers=ans, prefix_reuse=prefix_reuse,
                          batch_size=batch_size, rows_per_pass=rows_per_pass, progress=progress, desc=desc)


def _check_answers(data: TaskDataset, answers: Any) -> Int[Tensor, "rows answers"] | None:
    """``answers`` (``"auto"``: ``data.row_meta["answers"]``) as ``[rows, n_answers]`` ids, or None."""
    if isinstance(answers, str) and answers == "auto":
        answers = data.row_meta.get("answers")
    ans = None if answers is None else torch.as_tensor(answers, dtype=torch.long)
    if ans is not None and (ans.ndim != 2 or ans.shape[0] != len(data)):
        raise ValueError(f"answers must be [rows, n_answers] with {len(data)} rows; got {tuple(ans.shape)}")
    return ans


def _check_positions(data: TaskDataset, positions: Tensor | None) -> Tensor | None:
    if positions is not None and tuple(positions.shape) != tuple(data.tokens.shape):
        raise ValueError(f"positions must be a bool mask shaped like the tokens {tuple(data.tokens.shape)}")
    return positions


def _check_configs(ctx: Context, data: TaskDataset, configs: Any, base: Any, answers: Any, name: str,
                   positions: Tensor | None = None):
    """The edge checks of :func:`score_configs`: ``(configs [K, L, H] float CPU or None, base [L, H],
    answers or None, positions)``."""
    L, H = ctx.n_layers, ctx.n_heads
    cfg = None
    if configs is not None:
        checks.gate_tensor(name, configs, (L, H), trailing=True)
        cfg = gates_mod.as_config_gates(configs, L, H).detach().float().cpu()
    base = torch.ones(L, H) if base is None else checks.gate_tensor("base", base, (L, H)).detach().float().cpu()
    return cfg, base, _check_answers(data, answers), _check_positions(data, positions)


def _score_configs(
    ctx: Context,
    data: TaskDataset,
    cfg: Float[Tensor, "configs layer head"] | None,
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    *,
    base: Float[Tensor, "layer head"] | None = None,
    answers: Int[Tensor, "rows answers"] | None = None,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    desc: str = "configs",
) -> RowScores:
    """The engine of :func:`score_configs` on a checked :class:`Context`: ``cfg`` ``[K, L, H]`` float
    on the CPU (or None), ``base`` ``[L, H]`` (None: all ones), ``answers`` ``[rows, n_answers]`` ids
    or None, ``positions`` shaped like ``data.tokens``; nothing is checked again."""
    model, dev, L = ctx.model, ctx.device, ctx.n_layers
    base = torch.ones(L, ctx.n_heads) if base is None else base
    ans = answers
    K, N = (1 if cfg is None else cfg.shape[0]), len(data)
    start = first_changed_layer(cfg, base) if prefix_reuse and cfg is not None else torch.zeros(K, dtype=torch.long)
    start = start.clamp(max=L - 1)  # a config equal to base still needs the last block to run
    groups = {int(k): (start == k).nonzero().flatten() for k in start.unique()}
    rows_per = max(1, min(batch_size, N))
    cfg_per = max(1, rows_per_pass // rows_per)

    lp = torch.zeros(K, N)
    ok = torch.zeros(K, N, dtype=torch.bool)
    al = None if ans is None else torch.zeros(K, N, ans.shape[1])
    chunks = [torch.arange(r, min(r + rows_per, N)) for r in range(0, N, rows_per)]
    steps = sum(len(range(0, len(g), cfg_per)) for g in groups.values()) * len(chunks)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    # the weights cast once for the whole call; torch's threads follow the CPU load (chg_lens.runtime)
    with torch.no_grad(), ctx.cast_weights(), runtime.LoadAwareThreads() as threads:
        for idx in chunks:
            tokens, mask = data.tokens[idx], data.loss_mask[idx]
            width = int(mask.any(dim=0).nonzero().max()) + 1
            src = rows_of(sources, idx, width)
            pos = None if positions is None else positions[idx, :width]
            reuse = [k for k in groups if k > 0]
            resid = {}
            if reuse:
                base_hooks = gates_mod.layer_hooks(base[None].to(dev), src, None if pos is None else pos.to(dev))
                with ctx.precision():
                    resid = models.residuals_at(model, tokens[:, :width].to(dev), reuse, base_hooks)
            for k, members in groups.items():
                for c in range(0, len(members), cfg_per):
                    threads.adapt()
                    which = members[c : c + cfg_per]
                    out = row_logprobs_unchecked(
                        ctx, tokens, mask, None if cfg is None else cfg[which].to(dev), src, pos,
                        answers=None if ans is None else ans[idx],
                        start_at_layer=k if k > 0 else None, resid=resid.get(k),
                    )
                    lp[which[:, None], idx[None, :]] = out.logprob_sum.float().cpu()
                    ok[which[:, None], idx[None, :]] = out.correct.cpu()
                    if al is not None:
                        al[which[:, None], idx[None, :]] = out.answer_logits.cpu()
                    bar.update(1)
    bar.close()
    return RowScores(lp, data.n_targets.clone(), ok, al)


@dataclass
class GateGradients:
    """Per row: the metric at gates 1 (``values``), ``d metric / d g`` of every head's gate at
    ``g = 1`` (``grads``), and the ungated :class:`RowScores` (``scores``, ``[1, rows]``)."""

    values: Float[Tensor, "rows"]
    grads: Float[Tensor, "rows layer head"]
    scores: RowScores


def gate_gradients(
    model,
    data: TaskDataset,
    metric: Callable[[RowScores], Float[Tensor, "1 rows"]],
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    *,
    answers: Any = "auto",
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "gradients",
    autocast: str | None = "off",
) -> GateGradients:
    """The gradient of a per-row metric with respect to every head's gate, at all gates 1: the
    batched differentiable path of the scoring engine (what attribution patching runs on).

    The gates are the hooks of :mod:`chg_lens.gates` (``z <- g * z + (1 - g) * source``, ``source``
    from ``sources``, None = zeros; ``positions`` as in :func:`chg_lens.gates.gate_z`), shaped
    ``[rows, n_layers, n_heads]``: one configuration per row (:func:`row_logprobs` with
    ``per_row=True``), so one forward and one backward per batch of ``batch_size`` rows give every
    row's gradient for every head. At ``g = 1`` the forward is the ungated run, and
    ``d metric / d g = sum over positions and d_head of (z - source) * d metric / d z``.
    ``metric`` maps :class:`RowScores` (``[1, rows]``) to the per-row values (e.g.
    ``lambda s: s.logprob_sum``); ``answers`` as in :func:`score_configs`. The weights get no
    gradient (:func:`chg_lens.models.frozen`). Returns :class:`GateGradients` on the CPU.

    Example::

        out = gate_gradients(model, data, lambda s: s.logprob_sum)          # zero-ablation gradients
        atp = -out.grads.mean(0)       # [n_layers, n_heads]: linear estimate of each head's ablation
    """
    ctx = context(model, data, autocast=autocast)
    if not callable(metric):
        raise TypeError(f"metric must be a function of RowScores; got {type(metric).__name__}")
    batch_size = checks.positive_int("batch_size", batch_size)
    return _gate_gradients(ctx, data, metric, sources, _check_positions(data, positions),
                           answers=_check_answers(data, answers), batch_size=batch_size, progress=progress, desc=desc)


def _gate_gradients(
    ctx: Context,
    data: TaskDataset,
    metric: Callable[[RowScores], Float[Tensor, "1 rows"]],
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    *,
    answers: Int[Tensor, "rows answers"] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "gradients",
) -> GateGradients:
    """The engine of :func:`gate_gradients` on a checked :class:`Context` (``answers`` as ids or
    None, ``positions`` shaped like ``data.tokens``); only the metric's output is checked, per batch."""
    L, H, dev, ans = ctx.n_layers, ctx.n_heads, ctx.device, answers
    N = len(data)
    values, grads = torch.zeros(N), torch.zeros(N, L, H)
    lp, ok = torch.zeros(1, N), torch.zeros(1, N, dtype=torch.bool)
    al = None if ans is None else torch.zeros(1, N, ans.shape[1])
    chunks = [torch.arange(r, min(r + batch_size, N)) for r in range(0, N, batch_size)]
    with models.frozen(ctx.model), torch.enable_grad(), runtime.LoadAwareThreads() as threads:
        for idx in tqdm(chunks, desc=desc, disable=not progress, leave=False):
            threads.adapt()
            tokens, mask = data.tokens[idx], data.loss_mask[idx]
            width = int(mask.any(dim=0).nonzero().max()) + 1
            g = torch.ones(len(idx), L, H, device=dev, requires_grad=True)
            out = row_logprobs_unchecked(ctx, tokens, mask, g, rows_of(sources, idx, width),
                                         None if positions is None else positions[idx, :width],
                                         answers=None if ans is None else ans[idx], per_row=True)
            value = metric(out).reshape(-1)
            if value.shape[0] != len(idx):
                raise ValueError(f"metric must give one value per row ({len(idx)}); got {tuple(value.shape)}")
            if not value.requires_grad:
                raise ValueError("the metric is not differentiable in the gates (accuracy is not); use the "
                                 "log-prob, the probability or the logit difference")
            (grad,) = torch.autograd.grad(value.sum(), g)
            values[idx] = value.detach().float().cpu()
            grads[idx] = grad.float().cpu()
            lp[:, idx] = out.logprob_sum.detach().float().cpu()
            ok[:, idx] = out.correct.cpu()
            if al is not None:
                al[:, idx] = out.answer_logits.detach().cpu()
    return GateGradients(values, grads, RowScores(lp, data.n_targets.clone(), ok, al))


def rows_of(sources: Mapping[int, Tensor] | None, idx: Tensor, width: int) -> dict[int, Tensor] | None:
    """The part of per-row sources that belongs to rows ``idx`` (shared ``[head, d_head]`` kept)."""
    if sources is None:
        return None
    return {l: (s[idx, :width] if s.ndim == 4 else s) for l, s in sources.items()}


def metrics(scores: RowScores) -> dict[str, Tensor]:
    """Per configuration, means over rows: ``logprob`` (summed target log-prob), ``logprob_mean``
    (per target token), ``accuracy`` (all targets argmax-correct) and, with answers, ``logit_diff``."""
    out = {
        "logprob": scores.logprob_sum.mean(dim=1),
        "logprob_mean": scores.logprob_mean.mean(dim=1),
        "accuracy": scores.correct.float().mean(dim=1),
    }
    if scores.answer_logits is not None and scores.answer_logits.shape[-1] >= 2:
        out["logit_diff"] = scores.logit_diff.mean(dim=1)
    return out


# --------------------------------------------------------------------------------------------
# Head lists
# --------------------------------------------------------------------------------------------


def all_heads(model) -> list[tuple[int, int]]:
    """Every ``(layer, head)`` of the model, layer by layer."""
    return [(l, h) for l in range(models.n_layers(model)) for h in range(models.n_heads(model))]


def parse_heads(spec: str | Heads | None) -> list[tuple[int, int]] | None:
    """Heads from ``"L.H,L.H,..."`` (or a list of pairs) as ``[(layer, head), ...]``; None or ``""``
    stays None (no selection)::

        parse_heads("9.6, 10.0")      # [(9, 6), (10, 0)]
    """
    if spec is None or (isinstance(spec, str) and spec == ""):
        return None
    if not isinstance(spec, str):
        return [(int(l), int(h)) for l, h in spec]
    out = []
    for item in spec.split(","):
        try:
            layer, head = item.strip().split(".")
            out.append((int(layer), int(head)))
        except ValueError as err:
            raise ValueError(f"heads are written LAYER.HEAD, comma separated (e.g. 0.1,5.3); got {item!r}") from err
    return out


def check_heads(model, heads: Heads) -> None:
    """``ValueError`` unless every ``(layer, head)`` exists in ``model``."""
    L, H = models.n_layers(model), models.n_heads(model)
    bad = [(l, h) for l, h in heads if not (0 <= l < L and 0 <= h < H)]
    if bad:
        raise ValueError(f"heads {bad[:5]} are outside the model's {L} layers x {H} heads")


# --------------------------------------------------------------------------------------------
# z: the sources of mean ablation and patching
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_z(model, data: TaskDataset, *, mean: bool, batch_size: int = 32) -> dict[int, Tensor]:
    """Every head's ``z`` on ``data`` (CPU), batch by batch through :func:`chg_lens.models.cache_z`,
    read by hooks that change nothing.

    ``mean=True``: the mean ``z`` per layer and head over every real (non-padding) position,
    ``{layer: [head, d_head]}`` (the source of mean ablation). ``mean=False``: per row and position,
    ``{layer: [rows, pos, head, d_head]}`` over the full padded width (the source of a patch).

    Example::

        means = collect_z(model, train, mean=True)
        score_configs(model, val, configs, sources=means)      # mean ablation
    """
    return _collect_z(context(model, data), data, mean=mean, batch_size=batch_size)


@torch.no_grad()
def _collect_z(ctx: Context, data: TaskDataset, *, mean: bool, batch_size: int = 32) -> dict[int, Tensor]:
    """The engine of :func:`collect_z` on a checked :class:`Context` (``data`` checked against it)."""
    model, dev = ctx.model, ctx.device
    total: dict[int, Tensor] = {}
    rows: dict[int, list[Tensor]] = {}
    count = 0
    with runtime.LoadAwareThreads() as threads:
        for r in range(0, len(data), batch_size):
            threads.adapt()
            _collect_batch(model, dev, data, torch.arange(r, min(r + batch_size, len(data))), mean, total, rows)
            if mean:
                count += int((data.lengths[r : r + batch_size]).sum())
    if mean:
        return {l: (t / count).cpu() for l, t in total.items()}
    return {l: torch.cat(v) for l, v in rows.items()}


def _collect_batch(model, dev, data: TaskDataset, idx: Tensor, mean: bool, total: dict, rows: dict) -> None:
    """Add one batch's ``z`` to the running sums over real tokens (``mean``) or to the per-row lists."""
    if mean:
        width = int(data.lengths[idx].max())
        real = (torch.arange(width)[None, :] < data.lengths[idx, None]).to(dev)
        for l, z in models.cache_z(model, data.tokens[idx, :width].to(dev)).items():
            # z lives on its layer's device (a split model): the mask follows it
            total[l] = total.get(l, 0) + (z.float() * real.to(z.device)[..., None, None]).sum(dim=(0, 1))
    else:
        width = data.tokens.shape[1]
        for l, z in models.cache_z(model, data.tokens[idx].to(dev)).items():
            rows.setdefault(l, []).append(z[:, :width].cpu())
