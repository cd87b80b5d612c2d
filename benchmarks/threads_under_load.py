"""A fit's seconds per update quiet and under load, for each way of using the CPU (issue 28).

Conditions: quiet, and with 1 and with 2 other busy processes (pure-Python spin loops, one core
each). Settings, each in a fresh process (OpenMP reads its environment once, when torch loads):

* ``torch default``: torch imported before chg_lens (OpenMP's default spin-then-sleep wait),
  torch's thread count (one per core), ``CHG_LENS_THREADS=fixed``;
* ``1 thread``: ``OMP_NUM_THREADS=1``, fixed;
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE``, torch's thread count, fixed;
* ``load-aware``: torch imported first (spin wait), chg_lens's load-aware thread count
  (:class:`chg_lens.runtime.LoadAwareThreads`, the library default inside fits);
* ``chg_lens default``: what ``chg-lens fit`` and ``fit_chg`` do: chg_lens imported first (it sets no
  wait policy: ``OMP_WAIT_POLICY`` stays unset) and the load-aware thread count.

The work: SmolLM2-135M-Instruct (dequantised once to a Hugging Face folder under ``--cache``), IOI
rows, G0 updates of a 2-seed CHG fit at batch 16 with the default ``autocast="auto"``; the seconds per
update are the mean over ``--updates`` updates after a warm-up fit. Prints one table (s/update and
each setting's ratio to the best setting of its condition) and the CPU.

    PYTHONPATH=$PWD .venv-tl4/bin/python benchmarks/threads_under_load.py [--updates 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "torch default": {"env": {"CHG_LENS_THREADS": "fixed"}, "torch_first": True},
    "1 thread": {"env": {"OMP_NUM_THREADS": "1", "CHG_LENS_THREADS": "fixed"}, "torch_first": True},
    "passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE", "CHG_LENS_THREADS": "fixed"}, "torch_first": True},
    "load-aware": {"env": {"CHG_LENS_THREADS": "auto"}, "torch_first": True},
    "chg_lens default": {"env": {}, "torch_first": False},
}
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CHG_LENS_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def worker(args) -> None:
    if args.torch_first:
        import torch  # noqa: F401  (before chg_lens: no passive wait policy)
    import chg_lens
    import torch
    from chg_lens import models

    hf_model = __import__("transformers").AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(args.model_dir)
    model = chg_lens.load_model(hf_model, tokenizer=tok)
    train, _ = chg_lens.tasks.ioi(model, n_prompts=128)
    kw = dict(n_seeds=2, batch_size=16, reg_updates=1, progress=False)
    import warnings

    warnings.simplefilter("ignore")
    chg_lens.fit_chg(model, train, updates=2, **kw)  # warm-up
    t0 = time.perf_counter()
    r = chg_lens.fit_chg(model, train, updates=args.updates, **kw)
    out = {"s_per_update": r.meta["seconds"]["g0"] / args.updates, "wall": time.perf_counter() - t0,
           "threads_at_start": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
           "precision": models.describe_precision(model, "auto")}
    print("RESULT " + json.dumps(out), flush=True)


def prepare(cache: Path) -> Path:
    """SmolLM2 as a Hugging Face folder (dequantised from its GGUF once; later loads take seconds)."""
    folder = cache / "smollm2-135m-instruct-hf"
    if (folder / "config.json").exists():
        return folder
    import chg_lens  # noqa: F401
    from chg_lens.models import _load_hf

    hf_model, tok = _load_hf("smollm2-135m-instruct", None)
    hf_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def busy(n: int, nice: int = 0) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=(lambda: os.nice(nice)) if nice
                             else None) for _ in range(n)]


def run(setting: str, n_busy: int, folder: Path, updates: int, nice: int = 0) -> dict:
    spec = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(spec["env"])
    cmd = [sys.executable, __file__, "--worker", "--model-dir", str(folder), "--updates", str(updates)]
    if spec["torch_first"]:
        cmd.append("--torch-first")
    hogs = busy(n_busy, nice)
    try:
        time.sleep(0.5)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{setting} / {n_busy} busy failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-first", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--busy", default="0,1,2", help="numbers of other busy processes (default: 0,1,2)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--busy-nice", type=int, default=0, help="run the busy processes at this nice level (default 0)")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "chg_lens_bench"))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = sorted({"avx512_bf16", "amx_bf16"} & set(open("/proc/cpuinfo").read().split()))
    print(f"CPU: {cpu}, {os.cpu_count()} cores, native bf16 flags: {', '.join(flags) or 'none'}")
    folder = prepare(Path(a.cache))
    settings = a.settings.split(",")
    table: dict[int, dict[str, dict]] = {}
    for n_busy in [int(x) for x in a.busy.split(",")]:
        table[n_busy] = {}
        for s in settings:
            table[n_busy][s] = run(s, n_busy, folder, a.updates, a.busy_nice)
            print(f"  {n_busy} busy, {s:16s}: {table[n_busy][s]['s_per_update']:.2f} s/update", flush=True)
    print(f"\nseconds per update (ratio to the best setting of the condition); {a.updates} G0 updates, 2 seeds, batch 16"
          + (f"; busy processes at nice {a.busy_nice}" if a.busy_nice else ""))
    print(f"| setting | " + " | ".join(f"{n} busy" if n else "quiet" for n in table) + " |")
    print("|---|" + "---|" * len(table))
    for s in settings:
        cells = []
        for n, row in table.items():
            best = min(r["s_per_update"] for r in row.values())
            cells.append(f"{row[s]['s_per_update']:.2f} ({row[s]['s_per_update'] / best:.2f}x)")
        print(f"| {s} | " + " | ".join(cells) + " |")
    print(f"precision: {next(iter(next(iter(table.values())).values()))['precision']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu, "flags": flags, "updates": a.updates, "busy_nice": a.busy_nice, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
