"""chg_lens vs the reference implementation (nam-causal-head-gating 0.1.0), side by side on CPU.

One command reproduces the table in benchmarks/README.md::

    bash benchmarks/setup_reference.sh                       # once: the reference in its own venv
    python benchmarks/compare_reference.py --quick           # about 15-30 min on 2 busy cores
    python benchmarks/compare_reference.py --quick --only equal

Both sides run the same SmolLM2-135M-Instruct weights (dequantised once from the offline GGUF and
saved as a Hugging Face folder in ``--cache``), the same rows (IOI: last-token target; GSM8K
chain-of-thought: the whole solution is the target), the same batch size, number of masks and
number of updates. Every measurement is its own process (clean peak memory), and the runs
alternate reference, chg_lens, reference, chg_lens ... so that machine noise hits both. The
reference always uses CPU autocast (bf16); chg_lens runs with ``autocast="bf16"`` (and, for the
record, without it).

Parts: ``speed`` (updates/s and peak RSS at 1 and 10 masks, both tasks), ``fit`` (a full
three-stage fit's wall time at smoke scale), ``equal`` (same initial gates, same batches: NLL and
gate correlation after N updates of each stage). Results: a JSON file and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("CHG_LENS_SHARED_DATA", REPO.parent / "shared" / "data"))


def prepare_model(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32), written once from the GGUF."""
    folder = cache / "smollm2-135m-instruct-hf"
    if (folder / "config.json").exists():
        return folder
    from chg_lens.models import _load_hf

    model, tok = _load_hf("smollm2-135m-instruct", torch.float32)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prepare_data(task: str, folder: Path, n_prompts: int, cache: Path) -> Path:
    """Rows of a built-in task, tokenised once; both sides read the same tensors."""
    path = cache / f"data-{task}-{n_prompts}.pt"
    if path.exists():
        return path
    from transformers import AutoTokenizer

    from chg_lens import tasks

    tok = AutoTokenizer.from_pretrained(folder)
    if task == "ioi":
        train, _ = tasks.get_task("ioi")(tok, n_prompts=n_prompts, val_fraction=0.1)
    else:
        train, _ = tasks.get_task("math_cot")(tok, n_prompts=n_prompts, data_dir=SHARED / "gsm8k",
                                             val_fraction=0.1)
    torch.save({"tokens": train.tokens, "loss_mask": train.loss_mask, "lengths": train.lengths,
                "pad_token_id": train.pad_token_id}, path)
    return path


def with_batches(data_path: Path, out: Path, masks: int, batch: int, updates: int, reg_updates: int,
                 seed: int, n_layers: int, n_heads: int) -> Path:
    """Add fit_chg's initial logits and batches (exactly what fit_chg draws) for the reference."""
    from chg_lens.fitting import batch_rows, uniform_gate_logits

    data = torch.load(data_path)
    n = data["tokens"].shape[0]
    data["init_logits"] = uniform_gate_logits((masks, n_layers, n_heads), seed)
    data["batches"] = {"g0": [batch_rows(n, batch, seed, "g0", s) for s in range(updates)],
                       "reg": [batch_rows(n, batch, seed, "reg", s) for s in range(reg_updates)]}
    torch.save(data, out)
    return out


def run_worker(python: str, side: str, tmp: Path, tag: str, **kw) -> dict:
    out = tmp / f"{tag}.json"
    cmd = [python, str(HERE / "_worker.py"), "--side", side, "--out", str(out)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def machine() -> dict:
    cpu = "unknown"
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l for l in info.splitlines() if l.startswith("flags"))
        flags += " capability=" + torch.backends.cpu.get_cpu_capability()
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_start": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-python", default=os.environ.get("CHG_REF_PYTHON", "/tmp/venv-ref/bin/python"),
                   help="python of the reference's own venv (benchmarks/setup_reference.sh)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "chg_bench_cache"))
    p.add_argument("--quick", action="store_true", help="smoke scale (the README's numbers)")
    p.add_argument("--only", nargs="*", choices=["speed", "fit", "equal"], default=["speed", "fit", "equal"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--masks", type=int, nargs="*", default=[1, 10])
    p.add_argument("--tasks", nargs="*", default=["ioi", "math"])
    p.add_argument("--no-fp32", action="store_true", help="skip chg_lens without autocast")
    p.add_argument("--equal-updates", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch's default)")
    p.add_argument("--out", default=str(HERE / "results" / "compare_reference.json"))
    p.add_argument("--partial", default="", help="write the raw runs here after every repeat")
    args = p.parse_args()
    if not Path(args.ref_python).exists():
        raise SystemExit(f"no reference python at {args.ref_python}: run benchmarks/setup_reference.sh")
    repeats = args.repeats or (3 if args.quick else 5)
    updates = 2 if args.quick else 10
    batch = {"ioi": 8, "math": 1} if args.quick else {"ioi": 16, "math": 4}
    n_prompts = {"ioi": 128, "math": 32}
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = prepare_model(cache)
    data = {t: prepare_data(t, folder, n_prompts[t], cache) for t in args.tasks}
    info = machine()
    results: dict = {"machine": info, "settings": {"repeats": repeats, "updates": updates, "batch": batch,
                                                   "threads": args.threads or torch.get_num_threads()},
                     "speed": [], "fit": [], "equal": {}}
    me = sys.executable
    th = args.threads
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "speed" in args.only:
            # One process per side and repeat runs every case in turn (loading the model once); the
            # sides alternate: reference, chg_lens bf16, chg_lens fp32, reference, ...
            suite = [{"task": t, "masks": k, "batch": batch[t], "data": str(data[t])} for t in args.tasks
                     for k in args.masks]
            kw = dict(mode="stage", model=folder, data=suite[0]["data"], cases=json.dumps(suite), updates=updates,
                      warmup=1, threads=th)
            runs: dict[str, list] = {"ref": [], "ours_bf16": [], "ours_fp32": []}
            for r in range(repeats):
                runs["ref"].append(run_worker(args.ref_python, "ref", tmp, f"ref{r}", **kw)["cases"])
                if not args.no_fp32:
                    runs["ours_fp32"].append(run_worker(me, "ours", tmp, f"o32{r}", autocast="none", **kw)["cases"])
                runs["ours_bf16"].append(run_worker(me, "ours", tmp, f"ours{r}", autocast="bf16", **kw)["cases"])
                if args.partial:
                    Path(args.partial).write_text(json.dumps(runs, default=str))
                print("repeat", r, {s: [round(c["updates_per_s"], 4) for c in v[-1]] for s, v in runs.items() if v},
                      flush=True)
            for i, case in enumerate(suite):
                row = {"task": case["task"], "masks": case["masks"], "batch": case["batch"]}
                for s, v in runs.items():
                    if v:
                        row[s] = {"updates_per_s": median([x[i]["updates_per_s"] for x in v]),
                                  "fit_peak_rss_mib": median([x[i]["fit_peak_rss_mib"] for x in v]),
                                  "all_updates_per_s": [x[i]["updates_per_s"] for x in v]}
                results["speed"].append(row)
        if "fit" in args.only:
            fu = 4 if args.quick else 20
            runs = {"ref": [], "ours_bf16": []}
            for r in range(max(1, repeats - 1)):
                kw = dict(mode="fit", model=folder, data=data["ioi"], masks=4, batch=batch["ioi"], updates=fu,
                          reg_updates=fu, threads=th)
                runs["ref"].append(run_worker(args.ref_python, "ref", tmp, f"fref{r}", **kw)["seconds"])
                runs["ours_bf16"].append(run_worker(me, "ours", tmp, f"fours{r}", autocast="bf16", **kw)["seconds"])
                print("fit", r, {s: v[-1] for s, v in runs.items()}, flush=True)
            results["fit"] = {"task": "ioi", "masks": 4, "batch": batch["ioi"], "updates": fu, "reg_updates": fu,
                              **{s: median(v) for s, v in runs.items()}, "all": runs}
        if "equal" in args.only:
            results["equal"] = equal_check(args, folder, data["ioi"], tmp, th)
    info["load_avg_end"] = os.getloadavg()
    info["utc_end"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep parts not re-run
        old = json.loads(out.read_text())
        for part in ("speed", "fit", "equal"):
            if part not in args.only and old.get(part):
                results[part] = old[part]
    out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return 0


def equal_check(args, folder: Path, data_path: Path, tmp: Path, th: int) -> dict:
    """Same initial gates, same batches, the same schedule, no gradient clipping: compare."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    n = args.equal_updates or (10 if args.quick else 100)
    masks, batch, seed = 2, (4 if args.quick else 16), 0
    path = with_batches(data_path, tmp / "equal.pt", masks, batch, n, n, seed, cfg.num_hidden_layers,
                        cfg.num_attention_heads)
    kw = dict(mode="equal", model=folder, data=path, masks=masks, batch=batch, updates=n, reg_updates=n, seed=seed,
              threads=th)
    run_worker(args.ref_python, "ref", tmp, "eref", **kw)
    run_worker(sys.executable, "ours", tmp, "eours", autocast="bf16", **kw)
    ref, ours = torch.load(tmp / "eref.json.pt"), torch.load(tmp / "eours.json.pt")
    out = {"updates_per_stage": n, "masks": masks, "batch": batch}
    for stage in ("g0", "g_plus", "g_minus"):
        a, b = ref["nll"][stage][-5:].mean(), ours["nll"][stage][-5:].mean()  # same 5 last batches
        ga, gb = ref["gates"][stage].flatten().double(), ours["gates"][stage].flatten().double()
        corr = float(torch.corrcoef(torch.stack([ga, gb]))[0, 1])
        out[stage] = {"nll_ref": float(a), "nll_ours": float(b), "nll_rel_diff": float(abs(a - b) / abs(a)),
                      "gate_corr": corr, "max_abs_gate_diff": float((ga - gb).abs().max())}
        print("equal", stage, out[stage], flush=True)
    return out


def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (avx512_bf16={m['avx512_bf16']}), torch {m['torch']}; "
             f"started {m['utc']}, load average at start {tuple(round(x, 1) for x in m['load_avg_start'])}.", "",
             "| task | masks | batch | reference upd/s | chg_lens bf16 upd/s | ratio | chg_lens fp32 upd/s | "
             "ref peak RSS MiB | chg_lens bf16 peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["speed"]:
        ref, ours, o32 = r["ref"], r["ours_bf16"], r.get("ours_fp32")
        lines.append(f"| {r['task']} | {r['masks']} | {r['batch']} | {ref['updates_per_s']:.3f} | "
                     f"{ours['updates_per_s']:.3f} | **{ours['updates_per_s'] / ref['updates_per_s']:.2f}x** | "
                     f"{o32['updates_per_s'] if o32 else float('nan'):.3f} | {ref['fit_peak_rss_mib']:.0f} | "
                     f"{ours['fit_peak_rss_mib']:.0f} |")
    if res.get("fit"):
        f = res["fit"]
        lines += ["", f"Full three-stage fit (IOI, {f['masks']} masks, batch {f['batch']}, {f['updates']} + "
                      f"{f['reg_updates']} (+ {f['reg_updates']} for the reference's separate G-) updates): reference "
                      f"{f['ref']:.1f} s, chg_lens {f['ours_bf16']:.1f} s, ratio {f['ref'] / f['ours_bf16']:.2f}x."]
    if res.get("equal"):
        e = res["equal"]
        lines += ["", f"Equal results ({e['updates_per_stage']} updates per stage, {e['masks']} masks, batch {e['batch']}):", "",
                  "| stage | NLL reference | NLL chg_lens | rel. diff | gate correlation |", "|---|---|---|---|---|"]
        for s in ("g0", "g_plus", "g_minus"):
            x = e[s]
            lines.append(f"| {s} | {x['nll_ref']:.4f} | {x['nll_ours']:.4f} | {100 * x['nll_rel_diff']:.2f}% | "
                         f"{x['gate_corr']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
