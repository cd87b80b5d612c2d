"""Running a model and reading its output: :func:`run_until` (the one early-exit runner),
:func:`run_with_hooks` (the one full forward), :func:`final_residual`, :func:`residual_at` /
:func:`residuals_at`, :func:`cache_z`, :func:`run_until_layer`, and the one output path
:func:`unembed` / :func:`logits_at` (final norm, unembedding, the model's declared output
transform; the full forward where :func:`readout_is_exact` finds that path does not reproduce it).

Example::

    from chg_lens import models
    resid = models.final_residual(model, tokens)
    models.unembed(model, resid[:, -1])      # == model(tokens)[:, -1]
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .compat import (Hook, device, is_bridge, model_name, n_ctx, n_layers, resid_post_hook_name, resid_pre_hook_name,
                     z_hook_name)

# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    def __init__(self, value: Tensor):
        super().__init__("stopped early")
        self.value = value


def run_until(
    model,
    inputs: Tensor | None,
    stop_at: str,
    fwd_hooks: Sequence[Hook] = (),
    start_at_layer: int | None = None,
) -> Tensor:
    """The one early-exit runner: run the model on ``inputs`` (tokens, or the residual entering
    block ``start_at_layer``) with ``fwd_hooks`` and stop at the hook point ``stop_at``, returning
    the activation there; nothing after it is computed. Every partial pass goes through here::

        run_until(model, tokens, resid_post_hook_name(1))      # residual after block 1
    """

    def stop(value, hook):
        raise _Stop(value)

    hooks = [*fwd_hooks, (stop_at, stop)]
    try:
        if start_at_layer is None:
            model.run_with_hooks(inputs, fwd_hooks=hooks)
        else:
            model.run_with_hooks(inputs, start_at_layer=start_at_layer, fwd_hooks=hooks)
    except _Stop as s:
        return s.value
    raise RuntimeError(f"the model never reached {stop_at}; is it a decoder-only TransformerLens model?")


def run_with_hooks(model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[Hook] = ()) -> Tensor:
    """Full forward pass with hooks; returns logits ``[batch, pos, d_vocab]`` at every position.

    Public as the model interface's one full forward: :func:`readout_is_exact` compares the fast
    readout against it, and it is the reference to check any hook against (the gate hooks' tests
    do)::

        logits = models.run_with_hooks(model, tokens, gates.gate_hooks(model, g))
    """
    return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))


def final_residual(
    model,
    tokens: Int[Tensor, "batch pos"] | None,
    fwd_hooks: Sequence[Hook] = (),
    start_at_layer: int | None = None,
    resid: Float[Tensor, "batch pos d_model"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Run the blocks (with ``fwd_hooks``) and return the residual stream after the last block.

    The unembedding is not computed; pass the positions you need to :func:`unembed`. Tokens are
    expected right-padded: with causal attention, padding after a row's last token never changes
    the positions before it, so no attention mask is needed.

    With ``start_at_layer=k`` and ``resid`` (the residual entering block ``k``, e.g. from
    :func:`residual_at`) the pass starts at block ``k`` (``tokens`` is then unused). TransformerLens
    3.x skips blocks ``0..k-1``; the 4.x ``TransformerBridge`` still runs them internally on the
    injected residual and discards their output, so the result is the same but the saving smaller,
    and hooks on those blocks see the discarded pass.

    Example::

        r = residual_at(model, tokens, 5)
        final_residual(model, None, hooks, start_at_layer=5, resid=r)   # == final_residual(model, tokens, hooks)
    """
    last = resid_post_hook_name(n_layers(model) - 1)
    if start_at_layer is None or (start_at_layer == 0 and resid is None):
        return run_until(model, tokens, last, fwd_hooks)
    if resid is None or not 0 <= start_at_layer < n_layers(model):
        raise ValueError(
            f"start_at_layer={start_at_layer} needs the residual entering that block (resid) "
            f"and a layer in [0, {n_layers(model)})"
        )
    return run_until(model, resid, last, fwd_hooks, start_at_layer=start_at_layer)


def residual_at(
    model, tokens: Int[Tensor, "batch pos"], layer: int, fwd_hooks: Sequence[Hook] = ()
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer`` (blocks below it run with ``fwd_hooks``);
    the pass stops there. Feed it to :func:`final_residual` with ``start_at_layer=layer``."""
    return residuals_at(model, tokens, [layer], fwd_hooks)[layer]


def residuals_at(
    model, tokens: Int[Tensor, "batch pos"], layers: Sequence[int], fwd_hooks: Sequence[Hook] = ()
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """The residual streams entering each block in ``layers``, from one pass that stops at the
    highest of them (read-only hooks)."""
    layers = sorted(set(int(l) for l in layers))
    store: dict[int, Tensor] = {}
    top = layers[-1]

    def reader(layer: int):
        def hook(resid, hook):
            store[layer] = resid.detach().clone()
        return hook

    run_until(model, tokens, resid_pre_hook_name(top), [*fwd_hooks, *((resid_pre_hook_name(l), reader(l)) for l in layers)])
    return store


def cache_z(
    model,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[int] | None = None,
    fwd_hooks: Sequence[Hook] = (),
) -> dict[int, Float[Tensor, "batch pos head_index d_head"]]:
    """Every head's ``z`` of one run, per layer, read by hooks that change nothing.

    Example::

        clean_z = cache_z(model, clean.tokens)      # {layer: [rows, pos, n_heads, d_head]}
    """
    layers = list(range(n_layers(model))) if layers is None else list(layers)
    store: dict[int, Tensor] = {}

    def reader(layer: int):
        def hook(z, hook):
            store[layer] = z.detach().clone()
        return hook

    final_residual(model, tokens, [*fwd_hooks, *((z_hook_name(l), reader(l)) for l in layers)])
    return store


def final_norm(model) -> Callable[[Tensor], Tensor]:
    """The norm TransformerLens applies after the last block (identity when the model has none,
    e.g. a 3.x ``HookedTransformer`` with ``normalization_type=None``)."""
    ln = getattr(model, "ln_final", None)
    if ln is None or (not is_bridge(model) and getattr(model.cfg, "normalization_type", "LN") is None):
        return lambda x: x
    return ln


def output_transform(model, logits: Float[Tensor, "... d_vocab"]) -> Float[Tensor, "... d_vocab"]:
    """What the model does to its logits after the unembedding, taken from TransformerLens itself:
    on 4.x the architecture adapter's ``apply_output_logits_transform`` (Gemma 2/3
    ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...), on 3.x
    ``cfg.output_logits_soft_cap``."""
    transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
    if callable(transform):
        return transform(logits)
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def unembed(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Final norm, unembedding (weights and bias, tied or not) and the model's output transform,
    applied only to the residual vectors given: the model's own logits at those positions.

    Every logit chg_lens computes goes through here (or through :func:`logits_at`, which falls back
    to the full forward for a model this path does not reproduce).

    Example::

        resid = final_residual(model, tokens)
        unembed(model, resid[:, -1])      # == model(tokens)[:, -1]
    """
    shape = resid.shape
    flat = resid.reshape(1, -1, shape[-1])
    logits = output_transform(model, model.unembed(final_norm(model)(flat)))
    return logits.reshape(*shape[:-1], logits.shape[-1])


_READOUT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
_READOUT_TOL = 1e-3


def readout_is_exact(model) -> bool:
    """Whether :func:`unembed` on the last block's residual reproduces the model's own forward.

    Checked once per model on a short random sequence (two forward passes; the answer is cached).
    When it does not, chg_lens scores that model through its full forward (see :func:`logits_at`)
    and warns once. Models on the ``meta`` device are taken as exact (nothing to compare).
    """
    if model in _READOUT:
        return _READOUT[model]
    dev = device(model)
    if dev.type == "meta":
        return True
    g = torch.Generator().manual_seed(0)
    d_vocab = int(model.cfg.d_vocab)
    width = min(8, n_ctx(model) or 8)
    tokens = torch.randint(0, d_vocab, (2, width), generator=g).to(dev)
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):  # compare like with like
        full = run_with_hooks(model, tokens).float()
        ours = unembed(model, final_residual(model, tokens)).float()
    worst = float((ours.log_softmax(-1) - full.log_softmax(-1)).abs().max())
    low = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    exact = worst <= (_READOUT_TOL if not low else 0.1) * max(1.0, float(full.abs().max()))
    if not exact:
        warnings.warn(
            f"chg_lens cannot reproduce {model_name(model)}'s ({type(model).__name__}) output layer on a "
            f"subset of positions (log-probs differ by {worst:.3g}); it scores this model through its "
            "full forward instead: correct, but slower and with more memory", stacklevel=2)
    _READOUT[model] = exact
    return exact


def logits_at(
    model,
    tokens: Int[Tensor, "batch pos"] | None,
    select: Sequence[tuple[Tensor, Tensor]],
    fwd_hooks: Sequence[Hook] = (),
    start_at_layer: int | None = None,
    resid: Float[Tensor, "batch pos d_model"] | None = None,
    lead: int = 1,
) -> list[Float[Tensor, "lead n d_vocab"]]:
    """The model's logits at chosen positions, one pass with ``fwd_hooks``.

    ``select`` holds ``(rows, pos)`` index pairs into one block of ``batch // lead`` rows; the
    batch holds ``lead`` such blocks (e.g. one per gate configuration) and each result is
    ``[lead, len(rows), d_vocab]``. The blocks run up to the final residual and only the selected
    vectors are unembedded (:func:`unembed`); for a model where that does not reproduce its own
    forward (:func:`readout_is_exact`) the full forward runs and its logits are indexed instead.

    Example::

        rows, pos = loss_mask[:, 1:].nonzero(as_tuple=True)
        (logits,) = logits_at(model, tokens, [(rows, pos)], hooks)
    """
    if readout_is_exact(model):
        final = final_residual(model, tokens, fwd_hooks, start_at_layer=start_at_layer, resid=resid)
        final = final.reshape(lead, final.shape[0] // lead, *final.shape[1:])
        return [unembed(model, final[:, r.to(final.device), p.to(final.device)]) for r, p in select]
    if start_at_layer is None:
        full = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    else:
        full = model.run_with_hooks(resid, start_at_layer=start_at_layer, fwd_hooks=list(fwd_hooks))
    full = full.reshape(lead, full.shape[0] // lead, *full.shape[1:])
    return [full[:, r.to(full.device), p.to(full.device)] for r, p in select]


def run_until_layer(
    model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[Hook], last_layer: int
) -> None:
    """Run the blocks up to ``last_layer`` (inclusive) with read-only ``fwd_hooks`` and stop there.

    For recording activations of early layers without computing the rest of the model::

        run_until_layer(model, tokens, [(z_hook_name(1), save)], last_layer=1)
    """
    run_until(model, tokens, resid_post_hook_name(last_layer), fwd_hooks)
