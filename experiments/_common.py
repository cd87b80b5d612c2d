"""Plumbing shared by the experiment scripts: configs, command line, cached CHG fits, outputs.

Every script has a ``SMOKE`` config (SmolLM2-135M-Instruct on a CPU in minutes) and a ``FULL``
config (the paper's setting, for a GPU). ``--smoke`` picks the first, otherwise ``FULL`` is used;
single fields can be overridden (``--model``, ``--tasks``, ``--n-seeds``, ...). ``--tiny`` swaps the
model for a tiny random Llama with the GPT-2 tokenizer (only to test the scripts' plumbing).

CHG fits are cached in ``OUT/fits/<model>/<task>/<config hash>/`` and shared by every script that
writes to the same ``--out``; a fit whose folder exists is loaded, an interrupted one resumes from
its checkpoint. Each script's data (parquet + CSV) and figures (HTML) go to ``OUT/<script>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import chg_lens  # noqa: E402
from chg_lens import plot  # noqa: E402

TINY = "tiny-random"


@dataclass
class Config:
    """What an experiment runs: models x tasks, CHG seeds and budget, data size."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])
    tasks: list[str] = field(default_factory=lambda: ["ioi"])
    n_seeds: int = 2
    updates: int = 20
    reg_updates: int = 20
    batch_size: int = 8
    lam: float = 0.1
    n_prompts: int = 48
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_dir: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # script-specific knobs (e.g. ablation steps)


def parse(name: str, description: str, smoke: Config, full: Config, argv: list[str] | None = None):
    """Command line of a script: returns ``(args, config, out_dir)``; ``out_dir`` = OUT/<name>."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="CPU-sized setting (SmolLM2, minutes on 2 cores)")
    p.add_argument("--tiny", action="store_true", help="tiny random model instead of the configured ones (tests)")
    p.add_argument("--out", default="outputs", help="output root (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--tasks", nargs="+", default=None)
    for knob in ("n_seeds", "updates", "reg_updates", "batch_size", "n_prompts"):
        p.add_argument("--" + knob.replace("_", "-"), type=int, default=None)
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(smoke if args.smoke or args.tiny else full)
    for knob in ("models", "tasks", "n_seeds", "updates", "reg_updates", "batch_size", "n_prompts", "lam"):
        if getattr(args, knob) is not None:
            setattr(cfg, knob, getattr(args, knob))
    if args.tiny:
        cfg.models = [TINY]
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return args, cfg, out


_MODELS: dict[str, Any] = {}


def load(name: str):
    """A model by name, cached for the process. ``tiny-random``: a 2-layer random Llama with the
    GPT-2 tokenizer from the shared data folder (``CHG_LENS_SHARED_DATA``)."""
    if name not in _MODELS:
        if name == TINY:
            import torch
            from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

            shared = Path(os.environ.get("CHG_LENS_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
            tok = GPT2TokenizerFast.from_pretrained(str(shared / "tokenizers" / "gpt2"))
            tok.pad_token = tok.eos_token
            torch.manual_seed(0)
            hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                              max_position_embeddings=256, head_dim=8)).eval()
            _MODELS[name] = chg_lens.load_model(hf, tokenizer=tok)
        else:
            _MODELS[name] = chg_lens.load_model(name)
    return _MODELS[name]


def task_data(cfg: Config, model_name: str, task: str, seed: int = 0):
    """``(train, validation)`` of a registered task for a model, with the config's options."""
    options = {"seed": seed, **cfg.task_options.get(task, {})}
    if cfg.n_prompts is not None:
        options["n_prompts"] = cfg.n_prompts
    if cfg.data_dir.get(task) is not None:
        options["data_dir"] = cfg.data_dir[task]
    return chg_lens.tasks.build(task, load(model_name), **options)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(text).name or text)


def fit_key(cfg: Config, task: str) -> dict[str, Any]:
    """The settings a cached fit is keyed by (its folder name is their hash)."""
    key = {k: getattr(cfg, k) for k in ("n_seeds", "updates", "reg_updates", "batch_size", "lam", "n_prompts")}
    key["task_options"] = cfg.task_options.get(task, {})
    return key


def fit_dir(root: Path, cfg: Config, model_name: str, task: str) -> Path:
    digest = hashlib.sha1(json.dumps(fit_key(cfg, task), sort_keys=True).encode()).hexdigest()[:10]
    return root.parent / "fits" / _slug(model_name) / _slug(task) / digest


def fit_or_load(out: Path, cfg: Config, model_name: str, task: str, progress: bool = True):
    """The CHG fit for (model, task) under ``cfg`` (:func:`chg_lens.results.cached`): loaded if its
    folder exists, else fitted (with a resumable checkpoint) and saved. Returns ``(result, seconds_spent)``."""
    t0, fitted = time.time(), []

    def fit(folder: Path):
        model = load(model_name)
        train, val = task_data(cfg, model_name, task)
        result = chg_lens.fit_chg(model, train, n_seeds=cfg.n_seeds, updates=cfg.updates, reg_updates=cfg.reg_updates,
                                  batch_size=cfg.batch_size, lam=cfg.lam, validation=val, task=task,
                                  checkpoint_dir=folder / "checkpoint", progress=progress)
        result.meta["model"] = model_name
        fitted.append(True)
        return result

    folder = fit_dir(out, cfg, model_name, task)
    result = chg_lens.results.cached(folder, fit_key(cfg, task), fit, kind="chg")
    if fitted:  # written beside the saved result (the save refuses a folder that already holds other files)
        (folder / "summary.txt").write_text(result.summary() + "\n")
    return result, (time.time() - t0 if fitted else 0.0)


def write_frame(frame: pd.DataFrame, out: Path, name: str) -> Path:
    """``OUT/name.parquet`` and ``OUT/name.csv``."""
    frame.to_parquet(out / f"{name}.parquet", index=False)
    frame.to_csv(out / f"{name}.csv", index=False)
    return out / f"{name}.parquet"


def read_frame(out: Path, name: str) -> pd.DataFrame | None:
    """A frame written by :func:`write_frame` in an earlier run, or None."""
    path = out / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def write_figure(fig, out: Path, name: str) -> Path:
    """``OUT/name.html``, standalone (plotly.js embedded: opens offline)."""
    return plot.save_html(fig, out / f"{name}.html")


class Timer:
    """Records wall time of the whole script into ``OUT/timing.json`` at exit."""

    def __init__(self, out: Path):
        self.out, self.t0 = out, time.time()

    def done(self, **extra: Any) -> float:
        seconds = time.time() - self.t0
        (self.out / "timing.json").write_text(json.dumps({"seconds": round(seconds, 1), **extra}, indent=2))
        print(f"done in {seconds:.0f}s; outputs in {self.out}/")
        return seconds
