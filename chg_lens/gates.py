"""Head gates: the one mechanism under CHG, contrastive CHG, ablation sweeps and patching.

A gate scales a head's output ``z`` before ``W_O`` through a TransformerLens hook on
``blocks.{l}.attn.hook_z``. With a ``source`` the gate mixes two runs instead::

    z <- g * z + (1 - g) * source            # source = None means zeros

so ``g = 1`` keeps the head, ``g = 0`` zero-ablates it (or mean-ablates it, with the mean ``z`` as
``source``), and ``g = 0`` with another run's ``z`` as ``source`` patches it. No other code in
chg_lens multiplies or replaces ``z``.

Gate tensors are ``[n_layers, n_heads]`` (one configuration for the whole batch) or
``[n_configs, n_layers, n_heads]``: then the batch is ``n_configs`` equal blocks of rows in
config-major order (row ``i`` uses configuration ``i // (batch // n_configs)``), so with
``n_configs == batch`` every row has its own configuration, and with fewer configurations a batch of
prompts repeated once per configuration is gated without copying gates per row.

Example::

    from chg_lens.gates import gate_hooks
    gates = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
    gates[5, 1] = 0.0                                    # ablate L5H1
    logits = model.run_with_hooks(tokens, fwd_hooks=gate_hooks(model, gates))
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from . import models
from .models import Hook

Gates = Float[Tensor, "*configs layer head"]


def as_config_gates(gates: Tensor, n_layers: int, n_heads: int) -> Float[Tensor, "configs layer head"]:
    """Check a gate tensor's shape and return it as ``[n_configs, n_layers, n_heads]``."""
    if gates.ndim == 2:
        gates = gates.unsqueeze(0)
    if gates.ndim != 3 or tuple(gates.shape[1:]) != (n_layers, n_heads):
        raise ValueError(
            f"gates must be [n_layers, n_heads] = [{n_layers}, {n_heads}] or "
            f"[n_configs, {n_layers}, {n_heads}]; got {tuple(gates.shape)}"
        )
    return gates


def gate_z(
    z: Float[Tensor, "batch pos head_index d_head"],
    gates: Float[Tensor, "configs head_index"],
    source: Float[Tensor, "..."] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
) -> Float[Tensor, "batch pos head_index d_head"]:
    """Gate one layer's ``z``: ``g * z + (1 - g) * source`` (``source`` None = zeros).

    ``source`` broadcasts against one block of rows ``[rows, pos, head_index, d_head]`` (e.g. the
    same prompts' ``z`` from another run, or a mean ``[head_index, d_head]``); ``positions`` limits
    the gate to chosen token positions of each row (elsewhere ``z`` is left alone). A per-row
    ``source`` or ``positions`` with one row per row of the whole batch (not of one block) is taken
    row by row, config-major: with one configuration per row (``n_configs == batch``, the gradient
    path of :func:`chg_lens.scoring.gate_gradients`) row ``i`` mixes in ``source[i]``. The product
    is computed in (at least) float32 and returned in ``z``'s dtype.
    """
    n_cfg = gates.shape[0]
    batch = z.shape[0]
    if batch % n_cfg:
        raise ValueError(f"batch of {batch} rows is not a multiple of {n_cfg} gate configurations")
    block = batch // n_cfg
    # The one place where tensors meet an activation: all move to z's device here; gates and the
    # mix are computed in (at least) float32, also under bf16/fp16, and returned in z's dtype.
    work = torch.promote_types(z.dtype, torch.float32)
    g = gates.to(z.device, work)[:, None, None, :, None]
    zz = z.reshape(n_cfg, block, *z.shape[1:]).to(work)
    if source is None and positions is None:
        return (zz * g).reshape(z.shape).to(z.dtype)
    if source is None:
        other = torch.zeros((), dtype=work, device=z.device)
    elif source.ndim == 4 and block != batch and source.shape[0] == batch:  # one source row per batch row
        other = source.to(z.device, work).reshape(n_cfg, block, *source.shape[1:])
    else:
        other = source.to(z.device, work)
    mixed = zz * g + (1 - g) * other
    if positions is not None:
        pos = positions.to(z.device)
        if block != batch and pos.shape[0] == batch:
            pos = pos.reshape(n_cfg, block, pos.shape[1])
        mixed = torch.where(pos[..., None, None], mixed, zz)
    return mixed.reshape(z.shape).to(z.dtype)


def gate_hooks(
    model,
    gates: Gates,
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    skip_identity: bool = True,
) -> list[Hook]:
    """TransformerLens forward hooks that apply ``gates`` on every layer's ``hook_z``.

    ``sources`` maps a layer to the tensor its gates mix in (see :func:`gate_z`). Layers whose
    gates are all exactly 1 and need no gradient get no hook (``skip_identity``), which changes
    nothing in the result and saves work in sweeps.
    """
    gates = as_config_gates(gates, models.n_layers(model), models.n_heads(model))
    hooks: list[Hook] = []
    for layer in range(gates.shape[1]):
        g = gates[:, layer]
        if skip_identity and not g.requires_grad and bool((g == 1).all()):
            continue
        hooks.append((models.z_hook_name(layer), _layer_hook(g, (sources or {}).get(layer), positions)))
    return hooks


def _layer_hook(g: Tensor, source: Tensor | None, positions: Tensor | None) -> Callable:
    def hook(z: Tensor, hook) -> Tensor:
        return gate_z(z, g, source, positions)

    return hook


def ones(model, n_configs: int | None = None) -> Gates:
    """All-open gates, ``[n_layers, n_heads]`` or ``[n_configs, n_layers, n_heads]``."""
    shape = (models.n_layers(model), models.n_heads(model))
    return torch.ones(shape if n_configs is None else (n_configs, *shape))


def single_head_configs(
    model, heads: list[tuple[int, int]] | None = None, value: float = 0.0, base: Tensor | None = None
) -> Float[Tensor, "configs layer head"]:
    """One configuration per head: ``base`` (default all 1) with that head's gate set to ``value``."""
    L, H = models.n_layers(model), models.n_heads(model)
    heads = heads if heads is not None else [(l, h) for l in range(L) for h in range(H)]
    base = torch.ones(L, H) if base is None else base.detach().clone().float()
    configs = base.expand(len(heads), L, H).clone()
    for i, (l, h) in enumerate(heads):
        configs[i, l, h] = value
    return configs
