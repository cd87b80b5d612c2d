"""What counts as a model, on both TransformerLens lines: the versions (``TL_VERSION``, ``TL_MAJOR``),
:func:`is_tl_model` / :func:`is_bridge`, the shape accessors (:func:`n_layers`, :func:`n_heads`,
:func:`d_head`), the tokenizer, device and name, hook names (built with TransformerLens's own
helper), :func:`W_O`, :func:`frozen` and :func:`check_model`.

Example::

    from chg_lens import models
    models.n_layers(model), models.n_heads(model), models.z_hook_name(3)   # (30, 9, 'blocks.3.attn.hook_z')
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

import transformer_lens

TL_VERSION: str = getattr(transformer_lens, "__version__", None) or __import__(
    "importlib.metadata"
).metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

try:  # 4.x moved the helpers to `utilities`; 3.9 has both and warns on `utils`.
    from transformer_lens.utilities import get_act_name
except ImportError:  # pragma: no cover - older 3.x
    from transformer_lens.utils import get_act_name

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - 3.x before the bridge
    TransformerBridge = None  # type: ignore[assignment,misc]

if TL_MAJOR < 4:
    from transformer_lens import HookedTransformer
else:
    HookedTransformer = None  # type: ignore[assignment,misc]

Hook = tuple[str, Callable]
"""A TransformerLens forward hook: ``(hook_name, fn(activation, hook) -> activation | None)``."""


# --------------------------------------------------------------------------------------------
# What counts as a model
# --------------------------------------------------------------------------------------------


def is_tl_model(obj: Any) -> bool:
    """True for a TransformerLens model this library can drive (Bridge or HookedTransformer)."""
    if TransformerBridge is not None and isinstance(obj, TransformerBridge):
        return True
    return HookedTransformer is not None and isinstance(obj, HookedTransformer)


def is_bridge(model: Any) -> bool:
    """True for a TransformerLens 4.x ``TransformerBridge`` (False for a 3.x ``HookedTransformer``).

    Public as part of the model interface: the library branches on it where the two lines differ
    (:func:`final_norm`), and tests and user code can ask the same question::

        models.is_bridge(chg_lens.load_model("smollm2-135m-instruct"))   # True on TransformerLens 4
    """
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def n_layers(model) -> int:
    """Number of transformer blocks: ``models.n_layers(model)`` (a gate tensor is ``[..., n_layers, n_heads]``)."""
    return int(model.cfg.n_layers)


def n_heads(model) -> int:
    """Number of query heads: with grouped-query attention, gates act on query heads."""
    return int(model.cfg.n_heads)


def d_head(model) -> int:
    """Width of one head's ``z`` (``hook_z`` is ``[batch, pos, n_heads, d_head]``): the shape accessor
    beside :func:`n_layers` and :func:`n_heads`, e.g. for a patching source ``torch.zeros(n_heads, d_head)``."""
    return int(model.cfg.d_head)


def n_ctx(model) -> int | None:
    value = getattr(model.cfg, "n_ctx", None)
    return int(value) if value else None


def tokenizer(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "this model has no tokenizer; build data with TaskDataset.from_tokens(...) instead, "
            "or load the model with a tokenizer"
        )
    return tok


def device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_name(model) -> str:
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def z_hook_name(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``, named by TransformerLens's own helper."""
    return get_act_name("z", layer)


def pattern_hook_name(layer: int) -> str:
    return get_act_name("pattern", layer)


def resid_post_hook_name(layer: int) -> str:
    return get_act_name("resid_post", layer)


def resid_pre_hook_name(layer: int) -> str:
    """``blocks.{layer}.hook_resid_pre``: the residual stream entering block ``layer``."""
    return get_act_name("resid_pre", layer)


def W_O(model) -> Float[Tensor, "layer head d_head d_model"]:
    """Output weights per head, in TransformerLens's layout on both lines."""
    return model.W_O


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """Within the block no gradient can reach the model's weights; flags are restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _parse_dtype(dtype):
    from ..checks import dtype as check_dtype

    return check_dtype(dtype)


def _hook_names(model) -> Iterable[str]:
    return model.hook_dict.keys()


def check_model(model):
    """Return ``model`` if chg_lens can drive it (a TransformerLens model with per-head ``hook_z``
    on every layer), else raise a TypeError naming its class, before any work starts."""
    if not is_tl_model(model):
        raise TypeError(f"chg_lens needs a TransformerLens model (TransformerBridge or HookedTransformer); "
                        f"got {type(model).__name__}. Load it with chg_lens.load_model(...)")
    names = set(_hook_names(model))
    missing = [l for l in range(n_layers(model)) if z_hook_name(l) not in names]
    if missing:
        raise TypeError(
            f"chg_lens cannot drive this {type(model).__name__} ({model_name(model)}): layers {missing} have "
            f"no per-head attention output hook {z_hook_name(missing[0])!r}; head gating needs hook_z on "
            "every layer (a decoder-only transformer with standard multi-head attention)")
    return model
