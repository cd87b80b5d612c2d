"""Target log-probabilities under gate configurations: the one batched forward pass.

Every analysis in chg_lens (CHG fitting, contrastive CHG, ablation sweeps, patching, validation)
scores a model the same way: repeat a batch of rows once per gate configuration, run the blocks with
gate hooks on ``hook_z``, and unembed only the positions that predict target tokens.

Example::

    out = row_logprobs(model, data.tokens, data.loss_mask, gates=configs)   # configs [K, L, H]
    out.logprob_sum.shape   # [K, rows]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import gates as gates_mod
from . import models
from .data import TaskDataset
from .models import Hook


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
    autocast: str | None = "auto",
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

    ``autocast`` (``"auto"``: bf16 where the hardware has it natively, see
    :func:`chg_lens.models.resolve_autocast`; ``"bf16"``, ``"fp16"``, ``"off"``) sets the precision
    of the pass and the unembedding; gates and log-softmax are always float32.
    """
    width = int(loss_mask.any(dim=0).nonzero().max()) + 1
    tokens, loss_mask = tokens[:, :width], loss_mask[:, :width]
    dev = models.device(model)
    tokens = tokens.to(dev)
    loss_mask = loss_mask.to(dev)
    if positions is not None:
        positions = positions[:, :width].to(dev)
    hooks: list[Hook] = []
    n_cfg = 1
    if gates is not None:
        cfg_gates = gates_mod.as_config_gates(gates, models.n_layers(model), models.n_heads(model))
        n_cfg = cfg_gates.shape[0]
        if sources is not None:
            sources = {l: s[..., :width, :, :] if s.ndim >= 3 else s for l, s in sources.items()}
        hooks = gates_mod.gate_hooks(model, cfg_gates.to(dev), sources, positions)
    hooks.extend(extra_hooks)

    n_rows = tokens.shape[0]
    rows, pred_pos = loss_mask[:, 1:].nonzero(as_tuple=True)  # target at pos+1, predicted from pos
    targets = tokens[rows, pred_pos + 1]
    batch = tokens.repeat(n_cfg, 1) if n_cfg > 1 else tokens
    autocast = models.resolve_autocast(model, autocast)
    amp = models.autocast(model, autocast)
    if start_at_layer is not None:
        if resid is None:
            raise ValueError("start_at_layer needs resid, the residual entering that block")
        start = resid[:, :width].to(dev)
        start = start.repeat(n_cfg, 1, 1) if n_cfg > 1 else start
        with amp:
            final = models.final_residual(model, None, hooks, start_at_layer=start_at_layer, resid=start)
    else:
        with amp:
            final = models.final_residual(model, batch, hooks)
    final = final.reshape(n_cfg, n_rows, *final.shape[1:])
    answer_logits = None
    if answers is not None:
        answers = torch.as_tensor(answers, device=dev).long()
        if answers.ndim != 2 or answers.shape[0] != n_rows:
            raise ValueError(f"answers must be [rows, n_answers] with {n_rows} rows; got {tuple(answers.shape)}")
        first = loss_mask[:, 1:].to(torch.long).argmax(dim=1)  # position predicting each row's first target
        at_first = final[:, torch.arange(n_rows, device=dev), first]  # [K, rows, d_model]
        answer_logits = models.unembed(model, at_first).float().gather(
            -1, answers.expand(n_cfg, -1, -1)).contiguous()
    resid = final[:, rows, pred_pos]  # [K, N, d_model]
    with models.autocast(model, autocast):
        logits = models.unembed(model, resid).float()  # [K, N, d_vocab]
    target_logit = logits.gather(-1, targets.expand(n_cfg, -1).unsqueeze(-1)).squeeze(-1)
    logprob = target_logit - logits.logsumexp(dim=-1)
    hit = (logits.argmax(dim=-1) == targets).to(torch.long)

    logprob_sum = torch.zeros(n_cfg, n_rows, dtype=logprob.dtype, device=dev).index_add(1, rows, logprob)
    n_hit = torch.zeros(n_cfg, n_rows, dtype=torch.long, device=dev).index_add(1, rows, hit)
    n_targets = loss_mask.sum(dim=1)
    return RowScores(logprob_sum, n_targets, n_hit == n_targets, answer_logits)


@torch.no_grad()
def evaluate(
    model,
    data: TaskDataset,
    gates: Float[Tensor, "*configs layer head"] | None = None,
    batch_size: int = 32,
    max_rows_per_pass: int = 256,
    progress: bool = False,
    desc: str = "evaluate",
    autocast: str | None = "auto",
) -> RowScores:
    """Score every row of ``data`` under each configuration in ``gates`` (None = ungated).

    Configurations are batched into the same pass, ``max_rows_per_pass`` rows (configurations x
    rows) at a time. Returns :class:`RowScores` with ``[n_configs, len(data)]`` tensors on the CPU.
    ``autocast`` sets the precision (default ``"auto"``; see :func:`row_logprobs`).

    Example::

        scores = evaluate(model, val, torch.stack([g_plus, g_minus]))
        scores.logprob_sum.mean(1), scores.correct.float().mean(1)
    """
    model = models.as_model(model)
    data.check_model(model)
    cfg = None if gates is None else gates_mod.as_config_gates(gates, models.n_layers(model), models.n_heads(model))
    autocast = models.resolve_autocast(model, autocast)
    n_cfg = 1 if cfg is None else cfg.shape[0]
    rows_per = max(1, min(batch_size, len(data)))
    cfg_per = max(1, max_rows_per_pass // rows_per)
    lp = torch.zeros(n_cfg, len(data))
    ok = torch.zeros(n_cfg, len(data), dtype=torch.bool)
    steps = [(r, c) for r in range(0, len(data), rows_per) for c in range(0, n_cfg, cfg_per)]
    with models.cast_weights_once(model, autocast):
        for r, c in tqdm(steps, desc=desc, disable=not progress, leave=False):
            idx = torch.arange(r, min(r + rows_per, len(data)))
            sub = None if cfg is None else cfg[c : c + cfg_per]
            out = row_logprobs(model, data.tokens[idx], data.loss_mask[idx], sub, autocast=autocast)
            lp[c : c + out.logprob_sum.shape[0], idx] = out.logprob_sum.cpu()
            ok[c : c + out.correct.shape[0], idx] = out.correct.cpu()
    return RowScores(lp, data.n_targets.clone(), ok)
