"""The precision policy: what ``autocast=`` means for a pass (:func:`resolve_autocast`, the one place
that decides), what ``"auto"`` picks on this hardware (:func:`auto_precision`: CUDA compute
capability, the CPU's bf16 flags and a once-per-process matmul probe, :func:`cpu_bf16_speedup`),
how a result records it (:func:`describe_precision`, :func:`precision_meta`), the autocast region
(:func:`autocast`) and casting frozen weights once for a whole fit (:func:`cast_weights_once`).

Example::

    from chg_lens import models
    models.resolve_autocast(model, "auto")        # "bf16" where bf16 pays, else None
    models.describe_precision(model, "auto")      # one line: which precision, and why
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any, Iterator

import torch
from torch import Tensor

from .compat import _parse_dtype, device, is_tl_model
from .runners import readout_is_exact

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
