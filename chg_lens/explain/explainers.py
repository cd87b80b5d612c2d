"""Explainers: turn a head's recorded activity into a one-sentence explanation, and back into a
prediction of activity (for scoring by simulation).

- :class:`PatternExplainer` (offline, no network) scores the head against standard attention
  patterns (previous token, current token, first token / BOS, duplicate token, induction, tokens
  k back) using the recorded top attention sources, picks the best fit, and fits a small table
  of the head's mean output by token or token class (of the attended or the current token). The
  hypothesis (pattern + table) is stored with the sentence and predicts activity directly.
- :class:`OpenAIExplainer` prompts an LLM through the ``openai`` client (any OpenAI-compatible
  endpoint; key from ``OPENAI_API_KEY``, never logged or saved) with the salient events, and asks a
  simulator model to predict activity per token from the explanation alone.

Example::

    ex = PatternExplainer()
    rec = ex.explain(raw, i, train_windows, events)       # {"layer", "head", "explanation", "hypothesis", ...}
    pred = ex.predict(rec, raw.tokens[held_out], raw.token_str)   # [windows, pos]
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np
import pandas as pd

from .events import context as show_context
from .events import show, token_class
from .record import RawActivity

PATTERN_TEXT = {
    "previous_token": "attends from each token to the token just before it",
    "current_token": "attends from each token to itself",
    "first_token": "attends to the first token of the text (the BOS / attention-sink position)",
    "duplicate_token": "attends from a token to earlier occurrences of the same token",
    "induction": "attends from a token to the token that followed an earlier occurrence of the same token (induction)",
}
OFFSETS = (2, 3, 4)
PATTERNS = tuple(PATTERN_TEXT) + tuple(f"offset_{k}" for k in OFFSETS)
HEAD_NAMES = {"previous_token": "Previous-token head", "current_token": "Current-token head",
              "first_token": "First-token (BOS) head", "duplicate_token": "Duplicate-token head",
              "induction": "Induction head"}


def pattern_text(pattern: str) -> str:
    if pattern.startswith("offset_"):
        return f"attends from each token to the token {pattern.split('_')[1]} positions back"
    return PATTERN_TEXT[pattern]


# ----------------------------------------------------------------------------- patterns from tokens
def pattern_sources(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """For each pattern, the source position it predicts per query token (``-1``: none), ``[W, T]``."""
    W, T = tokens.shape
    pos = np.broadcast_to(np.arange(T), (W, T))
    out = {"previous_token": np.where(pos >= 1, pos - 1, -1),
           "current_token": np.where(pos >= 1, pos, -1),
           "first_token": np.where(pos >= 1, 0, -1)}
    for k in OFFSETS:
        out[f"offset_{k}"] = np.where(pos >= k, pos - k, -1)
    dup = np.full((W, T), -1)
    ind = np.full((W, T), -1)
    for w in range(W):
        last: dict[int, int] = {}
        before_last: dict[int, int] = {}
        for i in range(T):
            t = int(tokens[w, i])
            if t in last:
                dup[w, i] = last[t]
                j = last[t] if last[t] <= i - 2 else before_last.get(t, -1)
                ind[w, i] = j + 1 if j >= 0 else -1
                before_last[t] = last[t]
            last[t] = i
    out["duplicate_token"] = dup
    out["induction"] = ind
    return out


def pattern_fits(tokens: np.ndarray, sources: np.ndarray, weights: np.ndarray) -> dict[str, dict[str, float]]:
    """Attention mass (from the recorded top sources) on each pattern's targets, averaged over the
    query tokens where the pattern has a target (position 0 excluded); with the coverage."""
    W, T, k = sources.shape
    pos = np.arange(T)[None, :, None]
    tok_q = tokens[:, :, None]
    tok_s = np.take_along_axis(tokens, sources.reshape(W, T * k), 1).reshape(W, T, k)
    prev_s = np.take_along_axis(tokens, np.maximum(sources - 1, 0).reshape(W, T * k), 1).reshape(W, T, k)
    src = pattern_sources(tokens)
    masks = {"previous_token": sources == pos - 1, "current_token": sources == pos, "first_token": sources == 0,
             "duplicate_token": (sources < pos) & (tok_s == tok_q),
             "induction": (sources >= 1) & (sources < pos) & (prev_s == tok_q)}
    for o in OFFSETS:
        masks[f"offset_{o}"] = sources == pos - o
    out = {}
    for name in PATTERNS:
        defined = src[name] >= 0
        mass = (weights * masks[name]).sum(-1)
        n = int(defined.sum())
        out[name] = {"fit": float(mass[defined].mean()) if n else 0.0, "coverage": n / float(W * (T - 1))}
    return out


# ----------------------------------------------------------------------------- pattern explainer
class PatternExplainer:
    """Offline explainer: best-fitting standard attention pattern + a table of the head's output.

    The hypothesis predicts a head's activity at each token from the tokens alone: the pattern
    gives the source position, and the table gives the mean output for that source's (or the
    current token's) token or token class.
    """

    name = "pattern"

    def __init__(self, min_count: int = 3, max_tokens: int = 40, min_coverage: float = 0.02,
                 min_fit: float = 0.3):
        self.min_count, self.max_tokens = min_count, max_tokens
        self.min_coverage, self.min_fit = min_coverage, min_fit

    # -- fitting
    def explain(self, raw: RawActivity, head_index: int, windows: np.ndarray, events: pd.DataFrame | None = None
                ) -> dict[str, Any]:
        layer, head = raw.heads[head_index]
        tokens = raw.tokens[windows]
        act = raw.activity[head_index][windows].astype(np.float64)
        fits = pattern_fits(tokens, raw.sources[head_index][windows], raw.weights[head_index][windows])
        usable = {p: f for p, f in fits.items() if f["coverage"] >= self.min_coverage}
        best = max(usable, key=lambda p: (usable[p]["fit"], -PATTERNS.index(p))) if usable else "first_token"
        record = {"layer": layer, "head": head, "explainer": self.name, "status": "ok", "error": None}
        if act.std() < 1e-6 * max(1.0, abs(act.mean())):
            hyp = {"pattern": "inactive", "fit": fits[best]["fit"], "fits": _round(fits), "condition": "none",
                   "table": {}, "default": float(act.mean())}
            record.update(hypothesis=hyp, explanation=f"Writes a constant output ({act.mean():.3g}) on every token; "
                                                       f"it {pattern_text(best)} ({fits[best]['fit']:.0%} of its attention).")
            return record
        src = pattern_sources(tokens)[best]
        best_hyp, best_r = None, -np.inf
        for condition in ("source", "destination", "none"):
            hyp = self._table(tokens, src, act, condition, raw)
            hyp.update(pattern=best, fit=fits[best]["fit"], fits=_round(fits))
            pred = self.predict({"hypothesis": hyp}, tokens, raw.token_str)
            r = correlation(pred.reshape(-1), act.reshape(-1))
            r = -1.0 if np.isnan(r) else r
            if r > best_r + 1e-9:
                best_hyp, best_r = hyp, r
        best_hyp["train_correlation"] = round(float(best_r), 4)
        record.update(hypothesis=best_hyp, explanation=self.sentence(best_hyp, raw.token_str, usable))
        return record

    def _keys(self, tokens: np.ndarray, src: np.ndarray, condition: str, token_str: dict[int, str],
              bos: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: whether the pattern applies, and the token id / class that conditions the output."""
        W, T = tokens.shape
        applies = src >= 0
        if condition == "source":
            ref = np.where(applies, np.take_along_axis(tokens, np.maximum(src, 0), 1), -1)
        elif condition == "destination":
            ref = tokens.copy()
        else:
            ref = np.full((W, T), -1)
        pos0 = np.zeros((W, T), dtype=bool)
        pos0[:, 0] = True
        if condition == "source":
            is_start = np.where(applies, np.maximum(src, 0) == 0, False)
        else:
            is_start = pos0
        ids, inverse = np.unique(ref, return_inverse=True)
        names = np.array([token_class(token_str.get(int(t), ""), bos is not None and int(t) == bos) if t >= 0
                          else "" for t in ids], dtype=object)
        classes = names[inverse.reshape(ref.shape)]
        classes[is_start] = "start"
        return applies & ~pos0, ref, classes

    def _table(self, tokens, src, act, condition, raw) -> dict[str, Any]:
        bos = raw.meta.get("bos_token_id")
        applies, ref, classes = self._keys(tokens, src, condition, raw.token_str, bos)
        table: dict[str, float] = {}
        counts: dict[str, int] = {}
        pos0 = np.zeros_like(applies)
        pos0[:, 0] = True
        if pos0.any():
            table["start"], counts["start"] = float(act[pos0].mean()), int(pos0.sum())
        off = ~applies & ~pos0
        if off.any():
            table["off"], counts["off"] = float(act[off].mean()), int(off.sum())
        if condition != "none":
            for cls in np.unique(classes[applies]):
                m = applies & (classes == cls)
                table[f"class:{cls}"], counts[f"class:{cls}"] = float(act[m].mean()), int(m.sum())
            ids, n = np.unique(ref[applies], return_counts=True)
            frequent = ids[n >= self.min_count]
            order = np.argsort(-n[n >= self.min_count], kind="stable")[: self.max_tokens]
            for t in frequent[order]:
                m = applies & (ref == t)
                table[f"tok:{int(t)}"], counts[f"tok:{int(t)}"] = float(act[m].mean()), int(m.sum())
        if applies.any():
            table["on"], counts["on"] = float(act[applies].mean()), int(applies.sum())
        return {"condition": condition, "table": {k: round(v, 6) for k, v in table.items()},
                "counts": counts, "default": round(float(act.mean()), 6), "bos_token_id": bos}

    # -- prediction
    def predict(self, record: dict[str, Any], tokens: np.ndarray, token_str: dict[int, str]) -> np.ndarray:
        """Predicted activity ``[W, T]`` from the hypothesis and the tokens alone."""
        hyp = record["hypothesis"]
        table, default = hyp["table"], hyp["default"]
        if hyp["pattern"] == "inactive":
            return np.full(tokens.shape, default, dtype=np.float64)
        src = pattern_sources(tokens)[hyp["pattern"]]
        applies, ref, classes = self._keys(tokens, src, hyp["condition"], token_str, hyp.get("bos_token_id"))
        on = table.get("on", default)
        ids, inv = np.unique(ref, return_inverse=True)
        by_token = np.array([table.get(f"tok:{int(t)}", np.nan) for t in ids])[inv.reshape(ref.shape)]
        names, cinv = np.unique(classes.astype(str), return_inverse=True)
        by_class = np.array([table.get(f"class:{c}", on) for c in names])[cinv.reshape(ref.shape)]
        out = np.where(applies, np.where(np.isnan(by_token), by_class, by_token), table.get("off", default))
        out[:, 0] = table.get("start", default)
        return out.astype(np.float64)

    # -- words
    def sentence(self, hyp: dict[str, Any], token_str: dict[int, str], usable: dict[str, dict]) -> str:
        p, fit = hyp["pattern"], hyp["fit"]
        where = " where it applies" if p in ("duplicate_token", "induction") else ""
        if fit >= self.min_fit:
            text = f"{HEAD_NAMES.get(p, 'Positional head')}: it {pattern_text(p)} ({fit:.0%} of its attention{where})"
        else:
            text = (f"No standard attention pattern fits well (best: it {pattern_text(p)}, {fit:.0%} of its "
                    f"attention{where})")
        others = [q for q in usable if q != p and usable[q]["fit"] >= 0.2]
        if others:
            text += "; also " + ", ".join(f"{q.replace('_', ' ')} {usable[q]['fit']:.0%}" for q in others[:2])
        table, counts = hyp["table"], hyp["counts"]
        if hyp["condition"] == "none":
            if "on" in table and "off" in table:
                hi = "where the pattern applies" if table["on"] > table["off"] else "where the pattern does not apply"
                text += f"; its output is larger {hi}"
            return text + "."
        items = [(k, v) for k, v in table.items() if (k.startswith("tok:") or k.startswith("class:"))
                 and counts.get(k, 0) >= self.min_count]
        items.sort(key=lambda kv: -kv[1])
        names = []
        for k, _ in items[:3]:
            if k.startswith("tok:"):
                names.append(repr(show(token_str.get(int(k[4:]), "?"))))
            else:
                names.append("the first token" if k == "class:start" else f"a {k[6:]}")
        which = "attended token" if hyp["condition"] == "source" else "current token"
        if names:
            text += f"; its output is largest when the {which} is " + ", ".join(names[:-1]) + \
                    (" or " if len(names) > 1 else "") + names[-1]
        return text + "."


def _round(fits: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {p: {k: round(v, 4) for k, v in f.items()} for p, f in fits.items()}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sa, sb = a.std(), b.std()
    if sa < 1e-12 or sb < 1e-12:
        return float("nan")
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


# ----------------------------------------------------------------------------- LLM explainer
EXPLAIN_SYSTEM = (
    "You are an interpretability researcher explaining what one attention head in a transformer language "
    "model does. You see text excerpts where the head's output is large; the token where it is active is "
    "marked [[like this]], and 'attends to' lists the earlier tokens it looks at (position, weight). "
    "Activity is scaled from 0 to 10. Describe in ONE sentence which tokens make it active and what it "
    "attends to. Answer exactly as: Explanation: <one sentence>"
)
SIMULATE_SYSTEM = (
    "You predict how active an attention head of a language model is at each token, from an explanation "
    "of the head alone. For each numbered token give an activity from 0 (inactive) to 10 (maximal). "
    "Answer with one line per token, exactly as: <index>: <activity>"
)


class LLMError(RuntimeError):
    """An LLM call failed after its retries; the message never contains the API key."""


class OpenAIExplainer:
    """Explain heads with an LLM through the ``openai`` client, and simulate with it.

    Any OpenAI-compatible endpoint works (``base_url``). The key comes from ``api_key`` or
    ``OPENAI_API_KEY``; it is held only by the client and scrubbed from error messages.
    Transient errors (429, 408/409, 5xx, timeouts, connection errors) are retried ``max_retries``
    times with exponential backoff (``Retry-After`` is honoured, capped at ``max_backoff``);
    ``requests_per_minute`` spaces calls out.

        ex = OpenAIExplainer(base_url="http://localhost:8000/v1", model="qwen2.5-7b-instruct")
    """

    name = "openai"

    def __init__(self, model: str = "gpt-4o-mini", base_url: str | None = None, simulator_model: str | None = None,
                 api_key: str | None = None, timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0, requests_per_minute: float | None = None, prompt_events: int = 20,
                 sim_windows: int = 6, max_tokens: int = 300):
        try:
            import openai
        except ImportError as err:
            raise ImportError("the openai explainer needs the `openai` package: pip install 'chg_lens[explain]'") from err
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            if not base_url:
                raise ValueError("the openai explainer needs OPENAI_API_KEY in the environment (or --base-url of a "
                                 "local OpenAI-compatible server that needs no key)")
            key = "no-key"
        self._openai = openai
        self._key = key
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self.model, self.simulator_model = model, simulator_model or model
        self.base_url = base_url
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.min_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.prompt_events, self.sim_windows, self.max_tokens = prompt_events, sim_windows, max_tokens
        self._last_call = 0.0
        self.calls = 0

    def settings(self) -> dict[str, Any]:
        """What to record about this explainer (never the key)."""
        return {"explainer": self.name, "llm_model": self.model, "simulator_model": self.simulator_model,
                "base_url": self.base_url}

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def chat(self, messages: list[dict[str, str]], model: str | None = None) -> str:
        """One chat completion with retries; returns the message text or raises :class:`LLMError`."""
        openai = self._openai
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            wait = self.min_interval - (time.monotonic() - self._last_call)
            if wait > 0:
                time.sleep(wait)
            self._last_call = time.monotonic()
            self.calls += 1
            try:
                resp = self._client.chat.completions.create(model=model or self.model, messages=messages,
                                                            temperature=0.0, max_tokens=self.max_tokens)
                return resp.choices[0].message.content or ""
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                last, delay = err, None
            except openai.APIStatusError as err:
                if err.status_code not in (408, 409, 429) and err.status_code < 500:
                    raise LLMError(self.scrub(f"HTTP {err.status_code}: {err.message}")) from None
                last = err
                delay = _retry_after(err)
            if attempt < self.max_retries:
                time.sleep(min(self.max_backoff, delay if delay is not None else self.backoff * 2 ** attempt))
        raise LLMError(self.scrub(f"{type(last).__name__} after {self.max_retries + 1} attempts: {last}")) from None

    # -- explain
    def prompt(self, raw: RawActivity, head_index: int, events: pd.DataFrame) -> list[dict[str, str]]:
        layer, head = raw.heads[head_index]
        top = events[events.kind == "top"].head(self.prompt_events)
        low = events[events.kind == "random"].head(max(3, self.prompt_events // 4))
        scale = max(float(top.activity.max()) if len(top) else 1.0, 1e-9)
        lines = [f"Attention head: layer {layer}, head {head}.", "", "Excerpts where it is most active:"]
        for n, r in enumerate(top.itertuples(), 1):
            lines.append(f"{n}. activity {10 * r.activity / scale:.0f} | {r.context} | attends to: {r.attended}")
        lines += ["", "Excerpts where it is NOT active:"]
        for n, r in enumerate(low.itertuples(), 1):
            lines.append(f"{n}. activity {10 * r.activity / scale:.0f} | {r.context} | attends to: {r.attended}")
        lines += ["", "What does this head do? Answer as: Explanation: <one sentence>"]
        return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]

    def explain(self, raw: RawActivity, head_index: int, windows: np.ndarray, events: pd.DataFrame) -> dict[str, Any]:
        layer, head = raw.heads[head_index]
        record = {"layer": layer, "head": head, **self.settings(), "hypothesis": None}
        try:
            text = parse_explanation(self.chat(self.prompt(raw, head_index, events)))
            if not text:
                raise LLMError("the model's answer held no explanation")
            record.update(explanation=text, status="ok", error=None)
        except Exception as err:  # a failed head is recorded, never fatal
            msg = str(err) if isinstance(err, LLMError) else f"{type(err).__name__}: {err}"
            record.update(explanation="", status="failed", error=self.scrub(msg))
        return record

    # -- simulate
    def simulate_window(self, explanation: str, tokens: np.ndarray, token_str: dict[int, str]) -> np.ndarray:
        """Predicted activity (0-10) per token of one window, from the explanation alone."""
        listing = "\n".join(f"{i}: {show(token_str.get(int(t), '?'))!r}" for i, t in enumerate(tokens))
        user = f"Explanation of the head: {explanation}\n\nTokens:\n{listing}\n\nPredicted activity, one line per token:"
        answer = self.chat([{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": user}],
                           model=self.simulator_model)
        return parse_simulation(answer, len(tokens))

    def predict(self, record: dict[str, Any], tokens: np.ndarray, token_str: dict[int, str]) -> np.ndarray:
        if record.get("status") != "ok":
            raise LLMError("no explanation to simulate")
        return np.stack([self.simulate_window(record["explanation"], row, token_str) for row in tokens])


def _retry_after(err) -> float | None:
    try:
        value = err.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def parse_explanation(answer: str) -> str:
    """The sentence after ``Explanation:`` (or the first non-empty line), stripped of quotes."""
    m = re.search(r"explanation\s*:\s*(.+)", answer, flags=re.IGNORECASE)
    text = m.group(1) if m else next((line for line in answer.splitlines() if line.strip()), "")
    return text.strip().strip('"').strip("'").strip()


def parse_simulation(answer: str, n: int) -> np.ndarray:
    """``"<index>: <activity>"`` lines -> array of ``n`` predictions (missing tokens get 0)."""
    out = np.zeros(n, dtype=np.float64)
    for m in re.finditer(r"^\s*(\d+)\s*[:=\t-]\s*(-?\d+(?:\.\d+)?)", answer, flags=re.MULTILINE):
        i = int(m.group(1))
        if 0 <= i < n:
            out[i] = float(m.group(2))
    return out


__all__ = ["PatternExplainer", "OpenAIExplainer", "LLMError", "correlation",
           "parse_explanation", "parse_simulation", "pattern_fits", "pattern_sources", "show_context"]
