"""Checks at the edge, trust inside (issue 27 item 2): how often one public call re-validates its
inputs, how many calls it makes into each chg_lens module, and how long it takes.

    PYTHONPATH=. python benchmarks/edge_checks.py                    # counts and the walk (tiny model)
    PYTHONPATH=. python benchmarks/edge_checks.py --time             # + timings, tiny model
    PYTHONPATH=. python benchmarks/edge_checks.py --time --smollm2   # + timings on SmolLM2-135M, IOI, 16 prompts
    PYTHONPATH=/path/to/other/tree python benchmarks/edge_checks.py  # the same against another tree (before/after)

(a) Counts: the validating functions (``models.as_model``, ``models.check_model``,
``TaskDataset.check_model``, ``models.resolve_autocast``, ``gates.as_config_gates``,
``checks.gate_tensor``) are wrapped with counters during one ``patch_heads(model, clean, corrupted)``
and one ``head_sweep(model, data)`` call on a tiny random Llama (2 layers x 4 heads; 12 rows,
``batch_size=4``, so each call scores three chunks of rows).

(b) The walk: for one ``patch_heads`` and one ``fit_chg(model, data, updates=2, reg_updates=2)``
on the same tiny model, the number of Python calls whose code lives in each ``chg_lens`` module
(``sys.setprofile``; lambdas, hooks and nested functions count for their module; the fit runs with
``CHG_LENS_THREADS=fixed`` so its count does not depend on the machine's load). On a tree with
``scoring.row_logprobs_unchecked``, a third column fits with ``chg.nll_loss`` replaced by the
change proposed for chg.py (one :class:`chg_lens.scoring.Context` per fit, the unchecked pass on
every update; :func:`nll_loss_on_context`).

(c) Timings (``--time``): medians of ``--repeats`` calls of both, after one warm-up call. Only on a
quiet machine: with a load average above ``--max-load`` the script prints the counts and skips the
timings (``--force`` times anyway and says the load).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import chg_lens
from chg_lens import ablation, checks, gates, models, patching
from chg_lens.data import TaskDataset

COUNTED = ("models.as_model", "models.check_model", "TaskDataset.check_model", "models.resolve_autocast",
           "gates.as_config_gates", "checks.gate_tensor")
WORDS = ["<unk>", "<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(28)]


# ----------------------------------------------------------------------------- the tiny model and its data
def tiny_model():
    """A random 2-layer Llama (4 query heads over 2 key-value heads) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(tok_models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token=WORDS[0]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=WORDS[0], bos_token=WORDS[1],
                                   eos_token=WORDS[2], pad_token=WORDS[3])
    with tempfile.TemporaryDirectory() as d:
        fast.save_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, head_dim=8)
    return models.load_model(LlamaForCausalLM(cfg).eval(), tokenizer=tok)


def tiny_pair(n_rows: int = 12, width: int = 6, seed: int = 0) -> tuple[TaskDataset, TaskDataset]:
    """Clean and corrupted rows of equal length, the last token the target, answers [correct, wrong]."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, len(WORDS), (n_rows, width), generator=g)
    clean[:, 0] = 1
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, len(WORDS), (n_rows,), generator=g)
    mask = torch.zeros(n_rows, width, dtype=torch.bool)
    mask[:, -1] = True
    wrong = (clean[:, -1] - 4 + 1) % (len(WORDS) - 4) + 4
    answers = torch.stack([clean[:, -1], wrong], dim=1).tolist()
    out = []
    for t, name in ((clean, "tiny_clean"), (corrupted, "tiny_corrupted")):
        d = TaskDataset.from_tokens(t, mask, pad_token_id=3, name=name)
        d.row_meta["answers"] = answers
        out.append(d)
    return out[0], out[1]


# ----------------------------------------------------------------------------- (a) counts
def holders(owner, name: str) -> list:
    """``owner`` and, for a package such as ``chg_lens.models``, each of its modules that binds the same
    object under ``name``: a call inside the package looks the name up in its own module."""
    original = owner.__dict__[name]
    prefix = getattr(owner, "__name__", "") + "."
    return [owner] + [m for m in list(sys.modules.values()) if m is not owner and m is not None
                      and getattr(m, "__name__", "").startswith(prefix) and m.__dict__.get(name) is original]


@contextlib.contextmanager
def counting():
    """Wrap the validating functions with counters; yields the Counter."""
    counts: collections.Counter = collections.Counter()
    targets = [(models, "as_model"), (models, "check_model"), (TaskDataset, "check_model"),
               (models, "resolve_autocast"), (gates, "as_config_gates"), (checks, "gate_tensor")]
    saved = []
    for owner, name in targets:
        original = owner.__dict__[name]
        label = f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"

        def wrapper(*args, _original=original, _label=label, **kwargs):
            counts[_label] += 1
            return _original(*args, **kwargs)

        for holder in holders(owner, name):
            saved.append((holder, name, original))
            setattr(holder, name, wrapper)
    try:
        yield counts
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def count_calls(model, clean, corrupted) -> dict[str, dict[str, int]]:
    out = {}
    for label, call in (("patch_heads", lambda: patching.patch_heads(model, clean, corrupted, batch_size=4)),
                        ("head_sweep", lambda: ablation.head_sweep(model, clean, batch_size=4))):
        with counting() as counts:
            call()
        out[label] = {name: counts[name] for name in COUNTED}
    return out


# ----------------------------------------------------------------------------- (b) the walk
def walk(call) -> dict[str, int]:
    """Calls into each chg_lens module during ``call()`` (``sys.setprofile``)."""
    root = str(Path(chg_lens.__file__).resolve().parent) + os.sep
    counts: collections.Counter = collections.Counter()
    names: dict[str, str | None] = {}

    def module_of(filename: str) -> str | None:
        if filename not in names:
            path = str(Path(filename).resolve()) if filename and not filename.startswith("<") else ""
            names[filename] = path[len(root):-3].replace(os.sep, "/") if path.startswith(root) else None
        return names[filename]

    def profile(frame, event, arg):
        if event == "call":
            name = module_of(frame.f_code.co_filename)
            if name is not None:
                counts[name] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def fit(model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two updates do not converge: that is not what is measured
        return chg_lens.fit_chg(model, data, updates=2, reg_updates=2, progress=False)


def nll_loss_on_context(model, data, autocast="auto"):
    """chg.nll_loss with the change this work proposes for chg.py: one context per fit, the
    unchecked pass on every update."""
    from chg_lens import scoring

    ctx = scoring.context(model, autocast=autocast)

    def data_loss(gates, rows):
        out = scoring.row_logprobs_unchecked(ctx, data.tokens[rows], data.loss_mask[rows], gates)
        return out.nll, {"nll": out.nll}

    return data_loss


def walks(model, clean, corrupted) -> dict[str, dict[str, int]]:
    from chg_lens import chg, scoring

    out = {
        "patch_heads": walk(lambda: patching.patch_heads(model, clean, corrupted, batch_size=4)),
        "fit_chg": walk(lambda: fit(model, clean)),
    }
    if hasattr(scoring, "row_logprobs_unchecked"):  # the tree has the engine entry: the proposed nll_loss
        original, chg.nll_loss = chg.nll_loss, nll_loss_on_context
        try:
            out["fit_chg, nll_loss on a context"] = walk(lambda: fit(model, clean))
        finally:
            chg.nll_loss = original
    return out


# ----------------------------------------------------------------------------- (c) timings
def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(model, clean, corrupted, repeats: int, batch_size: int) -> dict[str, float]:
    return {
        "patch_heads": median_seconds(lambda: patching.patch_heads(model, clean, corrupted, batch_size=batch_size),
                                      repeats),
        "head_sweep": median_seconds(lambda: ablation.head_sweep(model, clean, batch_size=batch_size), repeats),
    }


# ----------------------------------------------------------------------------- printing
def table(rows: dict[str, dict[str, int]], title: str) -> str:
    cols = list(rows)
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = [f"### {title}", "", "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in keys:
        lines.append(f"| `{k}` | " + " | ".join(str(rows[c].get(k, 0)) for c in cols) + " |")
    lines.append("| total | " + " | ".join(str(sum(rows[c].values())) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time", action="store_true", help="also time patch_heads and head_sweep")
    p.add_argument("--smollm2", action="store_true", help="also time them on SmolLM2-135M (IOI, 16 prompts)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-load", type=float, default=1.5, help="skip timings above this 1-minute load average")
    p.add_argument("--force", action="store_true", help="time even on a loaded machine")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault(models.AUTOCAST_ENV, "off")  # fit_chg's "auto" is float32 on every machine
    os.environ.setdefault("CHG_LENS_THREADS", "fixed")  # the fit's thread re-judging (every 2 s) is not counted
    if args.threads:
        torch.set_num_threads(args.threads)

    tree = str(Path(chg_lens.__file__).resolve().parent)
    print(f"chg_lens from {tree}; TransformerLens line {'4 (Bridge)' if models.is_bridge(tiny := tiny_model()) else '3'}")
    clean, corrupted = tiny_pair()
    result: dict = {"tree": tree, "counts": count_calls(tiny, clean, corrupted), "walk": walks(tiny, clean, corrupted)}
    print(table(result["counts"], "validating calls during one call (tiny model, 12 rows, batch_size 4)"))
    print()
    print(table(result["walk"], "the walk: calls into each chg_lens module (tiny model)"))

    if args.time or args.smollm2:
        load = os.getloadavg()[0]
        result["load"] = load
        if load > args.max_load and not args.force:
            print(f"\nload average {load:.2f} > {args.max_load}: timings skipped (other jobs run; --force to time)")
        else:
            print(f"\ntimings (median of {args.repeats}, seconds; load average {load:.2f}, "
                  f"{torch.get_num_threads()} threads)")
            result["seconds"] = {"tiny": timings(tiny, clean, corrupted, args.repeats, 4)}
            if args.smollm2:
                real = models.load_model("smollm2-135m-instruct")
                rc, rx = chg_lens.tasks.ioi_pairs(real, n_prompts=16)
                result["seconds"]["smollm2_ioi16"] = timings(real, rc, rx, args.repeats, 16)
            for name, row in result["seconds"].items():
                print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
