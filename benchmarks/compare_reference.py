"""chg_lens vs the reference implementation (nam-causal-head-gating 0.1.0), side by side on CPU.

One command reproduces the table in benchmarks/README.md::

    bash benchmarks/setup_reference.sh                       # once: the reference in its own venv
    python benchmarks/compare_reference.py --quick           # about 40 min on 2 quiet cores
    python benchmarks/compare_reference.py --quick --only equal

Both sides run the same SmolLM2-135M-Instruct weights (dequantised once from the offline GGUF and
saved as a Hugging Face folder in ``--cache``), the same rows (IOI: last-token target; GSM8K
chain-of-thought: the whole solution is the target), the same batch size, number of masks and
number of updates. Every measurement is its own process (clean peak memory), and within every
repeat the sides run one after the other so that machine noise hits all of them.

Sides (see :func:`speed_sides`): the reference as shipped (it always enters CPU autocast, bf16);
the reference with that autocast disabled (float32); chg_lens at its defaults (``autocast="auto"``:
bf16 with the weights cast once where bf16 pays on this CPU, float32 elsewhere: see
``models.auto_precision``); chg_lens in float32, also with ``configs_per_pass`` where masks exceed it;
where the CPU has native bf16, chg_lens with plain per-op autocast (``ours_bf16_percast``: the weights
re-cast on every op, the lever cast-once replaces) and, where auto is float32, bf16 cast once (``ours_bf16``).
Without native bf16 the reference as shipped runs in the first repeat only and at most
``--shipped-max-masks`` masks: its emulated bf16 takes about half a minute per update there.

Also printed: the CPU's bf16 capability, the load average at every run (the sides alternate A B A B
within each repeat, so a loaded machine slows all of them; read the ratios), peak memory, and the
achieved GFLOP/s of the useful work (see :func:`update_flops`) against this machine's large-matmul
GFLOP/s (measured here, in float32 and bf16, between repeats) and a nominal peak (cores x clock x
FLOPs per cycle from the CPU flags).

Parts: ``speed`` (updates/s and peak RSS at 1 and 10 masks, both tasks), ``fit`` (a full
three-stage fit's wall time at smoke scale), ``equal`` (same initial gates, same batches, same
precision: NLL and gate correlation after 100 updates of each stage). Results: a JSON file and a
Markdown table.
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
        flag = k.replace('_', '-')
        cmd += [f"--{flag}" if v else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
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


def cpu_bf16_info() -> dict:
    """The CPU's bf16 capability as chg_lens sees it (``autocast="auto"`` follows it)."""
    from chg_lens import models

    flags = models.cpu_flags()
    native = models.cpu_native_bf16()
    return {"native_bf16": native, "flags": sorted(f for f in flags if "bf16" in f or "amx" in f),
            "torch_avx512_bf16": models._torch_cpu_bf16(),
            "bf16_matmul_speedup": round(models.cpu_bf16_speedup(), 3) if native else None,
            "default_precision_cpu": "bf16 autocast" if models.cpu_bf16_pays() else "float32"}


def nominal_peak_gflops(threads: int) -> dict:
    """threads x clock x FLOPs per cycle per core, from the flags: 2 FMA units of 512 bits (AVX-512:
    64 fp32 FLOP/cycle) or 256 bits (AVX2: 32); bf16 dot products (AVX512-BF16) double that. An
    estimate: the clock is /proc/cpuinfo's current MHz, and a vCPU may be a hyper-thread."""
    from chg_lens import models

    flags = models.cpu_flags()
    mhz = 0.0
    try:
        mhz = float(next(l.split(":")[1] for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("cpu MHz")))
    except (OSError, StopIteration, ValueError):
        pass
    fp32 = 64 if "avx512f" in flags else 32 if "avx2" in flags else 8
    bf16 = 2 * fp32 if ("avx512_bf16" in flags) else fp32
    ghz = mhz / 1000
    return {"threads": threads, "ghz": ghz, "fp32": threads * ghz * fp32, "bf16": threads * ghz * bf16}


def matmul_gflops(threads: int, n: int = 1024, reps: int = 5) -> dict:
    """GFLOP/s of an n x n x n matrix product in float32 and bf16 on ``threads`` threads (best of reps)."""
    import time

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            out[name] = 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(old)
    out["load_avg"] = os.getloadavg()[0]
    return out


def update_flops(folder: Path, data_path: Path, masks: int, batch: int, updates: int) -> float:
    """FLOPs of the useful work of one G0 update, averaged over the timed updates (the batches
    fit_chg draws): forward and the backward to the gates (no weight gradients: about the forward
    again) through every block at every token of the batch trimmed to its longest target row, and
    the unembedding at the target positions only. The reference does more (full-vocabulary logits
    at every position); both are credited with this work, so GFLOP/s compare like updates/s."""
    from transformers import AutoConfig

    from chg_lens.fitting import batch_rows

    cfg = AutoConfig.from_pretrained(folder)
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    dh = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * dh
    block = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size  # q, o, k, v, gate/up/down
    data = torch.load(data_path)
    mask = data["loss_mask"]
    total = 0.0
    for step in range(updates):
        rows = batch_rows(mask.shape[0], batch, 0, "g0", step)
        m = mask[rows]
        width = int(m.any(dim=0).nonzero().max()) + 1
        tokens, targets = len(rows) * width, int(m[:, 1:].sum())
        fwd = 2 * tokens * L * block + 4 * len(rows) * L * width * width * d + 2 * targets * d * V
        total += 2 * fwd * masks
    return total / updates


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
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="also run chg_lens with bf16 autocast, and compare fits in bf16 (default: when the CPU "
                        "has native bf16: AVX512-BF16 or AMX)")
    p.add_argument("--shipped-max-masks", type=int, default=1,
                   help="without native bf16, run the reference as shipped (bf16 autocast) only up to this many "
                        "masks: it is emulated and slow there")
    p.add_argument("--no-shipped", action="store_true", help="skip the reference as shipped")
    p.add_argument("--configs-per-pass", type=int, default=5,
                   help="also run chg_lens with this configs_per_pass where masks exceed it (0: skip)")
    p.add_argument("--equal-updates", type=int, default=None, help="updates per stage in the equal check (100)")
    p.add_argument("--alt-python", default=None,
                   help="equal check: also run chg_lens under this python (e.g. a TransformerLens 3.9 venv)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch's default)")
    p.add_argument("--out", default=str(HERE / "results" / "compare_reference.json"))
    p.add_argument("--partial", default="", help="write the raw runs here after every repeat")
    args = p.parse_args()
    if not Path(args.ref_python).exists():
        raise SystemExit(f"no reference python at {args.ref_python}: run benchmarks/setup_reference.sh")
    repeats = args.repeats or (3 if args.quick else 5)
    updates = 3 if args.quick else 10
    batch = {"ioi": 8, "math": 1} if args.quick else {"ioi": 16, "math": 4}
    n_prompts = {"ioi": 128, "math": 32}
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = prepare_model(cache)
    data = {t: prepare_data(t, folder, n_prompts[t], cache) for t in args.tasks}
    info = machine()
    info["bf16"] = cpu_bf16_info()
    bf16 = args.bf16 if args.bf16 is not None else info["bf16"]["native_bf16"]
    threads = args.threads or torch.get_num_threads()
    info["nominal_peak_gflops"] = nominal_peak_gflops(threads)
    print("CPU bf16:", info["bf16"], "| nominal peak GFLOP/s:", info["nominal_peak_gflops"], flush=True)
    matmul = [matmul_gflops(threads)]
    print("matmul GFLOP/s:", matmul[-1], flush=True)
    results: dict = {"machine": info, "settings": {"repeats": repeats, "updates": updates, "batch": batch,
                                                   "threads": args.threads or torch.get_num_threads(),
                                                   "configs_per_pass": args.configs_per_pass,
                                                   "shipped_max_masks": args.shipped_max_masks, "bf16": bf16},
                     "speed": [], "fit": [], "equal": {}, "matmul_gflops": matmul}
    me = sys.executable
    th = args.threads
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "speed" in args.only:
            # One process per side and repeat runs its cases in turn (loading the model once); the
            # sides alternate within every repeat so that machine noise hits all of them.
            suite = [{"task": t, "masks": k, "batch": batch[t], "data": str(data[t])} for t in args.tasks
                     for k in args.masks]
            sides = speed_sides(args, suite, me, bf16)
            runs: dict[str, list] = {name: [] for name in sides}
            for r in range(repeats):
                ran = []
                for name, (python, side, extra, cases) in sides.items():
                    if name == "ref" and not bf16 and r > 0:
                        continue  # emulated bf16: minutes per update, and the ratio is not close
                    ran.append(name)
                    kw = dict(mode="stage", model=folder, data=cases[0]["data"], cases=json.dumps(cases),
                              updates=updates, warmup=1, threads=th, **extra)
                    runs[name].append(run_worker(python, side, tmp, f"{name}{r}", **kw)["cases"])
                    if args.partial:
                        Path(args.partial).write_text(json.dumps(runs, default=str))
                print("repeat", r, {s: [(round(c["updates_per_s"], 4), "load %.1f" % c["load_avg"][0])
                                        for c in runs[s][-1]] for s in ran}, flush=True)
                matmul.append(matmul_gflops(threads))
                print("matmul GFLOP/s:", matmul[-1], flush=True)
            for case in suite:
                row = {"task": case["task"], "masks": case["masks"], "batch": case["batch"],
                       "flops_per_update": update_flops(folder, Path(case["data"]), case["masks"], case["batch"],
                                                        updates)}
                for name, v in runs.items():
                    got = [[c for c in rep if c["task"] == case["task"] and c["masks"] == case["masks"]] for rep in v]
                    got = [g[0] for g in got if g]
                    if got:
                        row[name] = {"updates_per_s": median([g["updates_per_s"] for g in got]),
                                     "fit_peak_rss_mib": median([g["fit_peak_rss_mib"] for g in got]),
                                     "all_updates_per_s": [g["updates_per_s"] for g in got],
                                     "load_avg": [g.get("load_avg") for g in got],
                                     "precision": got[0].get("precision")}
                results["speed"].append(row)
        if "fit" in args.only:
            fu = 4 if args.quick else 20
            precision = "bf16" if bf16 else "none"
            runs = {"ref": [], "ours": []}
            for r in range(max(1, repeats - 1)):
                kw = dict(mode="fit", model=folder, data=data["ioi"], masks=4, batch=batch["ioi"], updates=fu,
                          reg_updates=fu, threads=th, autocast=precision)
                runs["ref"].append(run_worker(args.ref_python, "ref", tmp, f"fref{r}", **kw)["seconds"])
                runs["ours"].append(run_worker(me, "ours", tmp, f"fours{r}", **kw)["seconds"])
                print("fit", r, {s: v[-1] for s, v in runs.items()}, flush=True)
            results["fit"] = {"task": "ioi", "masks": 4, "batch": batch["ioi"], "updates": fu, "reg_updates": fu,
                              "precision": "bf16 autocast" if bf16 else "float32",
                              **{s: median(v) for s, v in runs.items()}, "all": runs}
        if "equal" in args.only:
            results["equal"] = equal_check(args, folder, data["ioi"], tmp, th, bf16)
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


def speed_sides(args, suite: list[dict], me: str, bf16: bool) -> dict[str, tuple[str, str, dict, list[dict]]]:
    """name -> (python, side, worker options, cases). ``ref`` is the reference as shipped (its CPU
    autocast to bf16; on CPUs without native bf16 only up to ``--shipped-max-masks`` masks, it is
    slow there); ``ours_default`` chg_lens at its defaults (``autocast="auto"``); ``ref_fp32`` the
    reference with its autocast disabled; ``ours_fp32`` chg_lens in float32; ``ours_fp32_cpp`` the
    same with ``configs_per_pass`` (cases with more masks than that); ``ours_bf16`` chg_lens with
    bf16 autocast where that is not already the default (``--bf16`` on a CPU without native bf16);
    ``ours_bf16_percast`` bf16 with plain per-op autocast (no weights cast once)."""
    from chg_lens import models

    shipped = suite if bf16 else [c for c in suite if c["masks"] <= args.shipped_max_masks]
    sides = {"ref": (args.ref_python, "ref", {"autocast": "bf16"}, shipped),
             "ours_default": (me, "ours", {"autocast": "auto"}, suite),
             "ref_fp32": (args.ref_python, "ref", {"autocast": "none"}, suite),
             "ours_fp32": (me, "ours", {"autocast": "none"}, suite)}
    grouped = [c for c in suite if args.configs_per_pass and c["masks"] > args.configs_per_pass]
    if grouped:
        sides["ours_fp32_cpp"] = (me, "ours", {"autocast": "none", "configs_per_pass": args.configs_per_pass}, grouped)
    if bf16:
        if not models.cpu_bf16_pays():  # the default is float32 here: time bf16 (cast once) too
            sides["ours_bf16"] = (me, "ours", {"autocast": "bf16"}, suite)
        sides["ours_bf16_percast"] = (me, "ours", {"autocast": "bf16", "cast_once": False}, suite)
    return {k: v for k, v in sides.items() if v[3] and not (args.no_shipped and k == "ref")}


def compare_runs(x: dict, y: dict) -> dict:
    """Per stage: NLL of the last 5 updates (the same batches on both sides), the relative NLL
    difference at updates 1 and 10, the first update where it exceeds 0.1%, and the final gates'
    correlation and largest difference."""
    out = {}
    for stage in ("g0", "g_plus", "g_minus"):
        nx, ny = x["nll"][stage].double(), y["nll"][stage].double()
        rel = (nx - ny).abs() / nx.abs()
        over = (rel > 1e-3).nonzero()
        ga, gb = x["gates"][stage].flatten().double(), y["gates"][stage].flatten().double()
        a, b = nx[-5:].mean(), ny[-5:].mean()
        out[stage] = {"nll_a": float(a), "nll_b": float(b), "nll_rel_diff": float(abs(a - b) / abs(a)),
                      "rel_diff_update_1": float(rel[0]), "rel_diff_update_10": float(rel[min(9, len(rel) - 1)]),
                      "first_update_over_0.1%": int(over[0]) + 1 if len(over) else None,
                      "gate_corr": float(torch.corrcoef(torch.stack([ga, gb]))[0, 1]),
                      "max_abs_gate_diff": float((ga - gb).abs().max())}
    return out


def equal_check(args, folder: Path, data_path: Path, tmp: Path, th: int, bf16: bool) -> dict:
    """Same initial gates, same batches, the same schedule, no gradient clipping, the same precision
    (float32, or bf16 autocast on CPUs with native bf16): compare NLL traces and final gates of the
    reference and chg_lens, and (``--alt-python``: chg_lens under another venv, e.g. the other
    TransformerLens line) of chg_lens against itself: how far float rounding alone moves a fit."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    n = args.equal_updates or 100
    masks, batch, seed = 2, (4 if args.quick else 16), 0
    path = with_batches(data_path, tmp / "equal.pt", masks, batch, n, n, seed, cfg.num_hidden_layers,
                        cfg.num_attention_heads)
    kw = dict(mode="equal", model=folder, data=path, masks=masks, batch=batch, updates=n, reg_updates=n, seed=seed,
              threads=th, autocast="bf16" if bf16 else "none")
    run_worker(args.ref_python, "ref", tmp, "eref", **kw)
    run_worker(sys.executable, "ours", tmp, "eours", **kw)
    ref, ours = torch.load(tmp / "eref.json.pt"), torch.load(tmp / "eours.json.pt")
    out = {"updates_per_stage": n, "masks": masks, "batch": batch, "precision": "bf16 autocast" if bf16 else "float32",
           "ref_vs_ours": compare_runs(ref, ours)}
    if args.alt_python:
        run_worker(args.alt_python, "ours", tmp, "ealt", **kw)
        out["alt_python"] = args.alt_python
        out["ours_vs_alt"] = compare_runs(ours, torch.load(tmp / "ealt.json.pt"))
    for pair in ("ref_vs_ours", "ours_vs_alt"):
        for stage, x in out.get(pair, {}).items():
            print("equal", pair, stage, x, flush=True)
    return out


def table(res: dict) -> str:
    m, st = res["machine"], res["settings"]
    cpp = st.get("configs_per_pass")
    names = [("ref", "reference as shipped (bf16 autocast)"), ("ours_default", "chg_lens defaults"),
             ("ref_fp32", "reference float32"), ("ours_fp32", "chg_lens float32"),
             ("ours_fp32_cpp", f"chg_lens float32, configs_per_pass={cpp}"), ("ours_bf16", "chg_lens bf16 autocast"),
             ("ours_bf16_percast", "chg_lens bf16, per-op weight casts")]
    present = [(k, label) for k, label in names if any(k in r for r in res["speed"])]
    cpp = cpp if any("ours_fp32_cpp" in r for r in res["speed"]) else None

    def cell(r, k, key="updates_per_s", fmt="{:.3f}"):
        return fmt.format(r[k][key]) if k in r else "-"

    def ratio(r, a, b):
        return f"**{r[a]['updates_per_s'] / r[b]['updates_per_s']:.2f}x**" if a in r and b in r else "-"

    bf = m.get("bf16", {})
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (native bf16: {bf.get('native_bf16')}, flags "
             f"{bf.get('flags')}, bf16 matmul {bf.get('bf16_matmul_speedup')}x float32's speed, torch CPU capability {m['torch_cpu_capability']}; chg_lens's default here: "
             f"{bf.get('default_precision_cpu')}), torch {m['torch']}; {m['utc']} to "
             f"{m.get('utc_end', '?')}, load average at start {tuple(round(x, 1) for x in m['load_avg_start'])}, "
             f"at end {tuple(round(x, 1) for x in m.get('load_avg_end', (float('nan'),) * 3))}; medians of "
             f"{st['repeats']} runs of {st['updates']} timed updates after 1 warm-up.", "",
             "Updates per second (unregularised stage):", "",
             "| task | masks | batch | " + " | ".join(label for _, label in present)
             + " | defaults vs shipped | float32 ratio |" + (f" ratio with configs_per_pass={cpp} |" if cpp else "")
             + " cast once vs per-op |",
             "|---" * (3 + len(present) + 3 + (1 if cpp else 0)) + "|"]
    for r in res["speed"]:
        lines.append(f"| {r['task']} | {r['masks']} | {r['batch']} | " + " | ".join(cell(r, k) for k, _ in present)
                     + f" | {ratio(r, 'ours_default', 'ref')} | {ratio(r, 'ours_fp32', 'ref_fp32')} |"
                     + (f" {ratio(r, 'ours_fp32_cpp', 'ref_fp32')} |" if cpp else "")
                     + f" {ratio(r, 'ours_bf16' if 'ours_bf16' in r else 'ours_default', 'ours_bf16_percast')} |")
    mm = res.get("matmul_gflops") or []
    if mm and any("flops_per_update" in r for r in res["speed"]):
        peak = {k: median([x[k] for x in mm]) for k in ("fp32", "bf16")}
        nominal = m.get("nominal_peak_gflops", {})
        lines += ["", f"Achieved GFLOP/s of the useful work (forward + backward to the gates, unembedding at targets "
                      f"only; see update_flops) against this machine's 1024^3 matrix product measured between repeats "
                      f"(median: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s) and a nominal peak "
                      f"({nominal.get('threads')} threads x {nominal.get('ghz', 0):.2f} GHz: fp32 "
                      f"{nominal.get('fp32', 0):.0f}, bf16 {nominal.get('bf16', 0):.0f} GFLOP/s):", "",
                  "| task | masks | batch | GFLOP per update | " + " | ".join(label for _, label in present) + " |",
                  "|---" * (4 + len(present)) + "|"]
        for r in res["speed"]:
            gf = r["flops_per_update"] / 1e9
            cells = []
            for k, label in present:
                if k not in r:
                    cells.append("-")
                    continue
                got = gf * r[k]["updates_per_s"]
                ref_peak = peak["bf16"] if ("bf16" in k or k == "ref" or str(r[k].get("precision", "")).startswith("bf16")) \
                    else peak["fp32"]
                cells.append(f"{got:.1f} ({100 * got / ref_peak:.0f}%)")
            lines.append(f"| {r['task']} | {r['masks']} | {r['batch']} | {gf:.1f} | " + " | ".join(cells) + " |")
        lines += ["", "(percent: of the measured matrix-product GFLOP/s in the side's precision)"]
    lines += ["", "Peak resident memory during those updates (MiB, model included):", "",
              "| task | masks | batch | " + " | ".join(label for _, label in present) + " |",
              "|---" * (3 + len(present)) + "|"]
    for r in res["speed"]:
        lines.append(f"| {r['task']} | {r['masks']} | {r['batch']} | "
                     + " | ".join(cell(r, k, "fit_peak_rss_mib", "{:.0f}") for k, _ in present) + " |")
    if res.get("fit"):
        f = res["fit"]
        lines += ["", f"Full three-stage fit ({f.get('precision', 'float32')}; IOI, {f['masks']} masks, batch "
                      f"{f['batch']}, {f['updates']} + {f['reg_updates']} updates, the reference's G+ and G- one after "
                      f"the other, chg_lens's in shared passes): reference {f['ref']:.1f} s, chg_lens {f['ours']:.1f} s, "
                      f"ratio **{f['ref'] / f['ours']:.2f}x** (medians of {len(f['all']['ref'])})."]
    if res.get("equal"):
        e = res["equal"]
        lines += ["", f"Equal results ({e.get('precision', 'float32')}; same initial gates, same batches, "
                      f"{e['updates_per_stage']} updates per stage, {e['masks']} masks, batch {e['batch']}; NLL = mean "
                      "of the last 5 updates; rel. diff at update k = |NLL_a - NLL_b| / NLL_a of that update):", "",
                  "| runs compared | stage | NLL a | NLL b | rel. diff | rel. diff update 1 / 10 | first update > 0.1% "
                  "| gate correlation | max abs gate diff |", "|---|---|---|---|---|---|---|---|---|"]
        for pair, label in (("ref_vs_ours", "a = reference, b = chg_lens"),
                            ("ours_vs_alt", f"a = chg_lens, b = chg_lens under {e.get('alt_python')}")):
            for s, x in e.get(pair, {}).items():
                first = x["first_update_over_0.1%"]
                lines.append(f"| {label} | {s} | {x['nll_a']:.4f} | {x['nll_b']:.4f} | {100 * x['nll_rel_diff']:.2f}% | "
                             f"{100 * x['rel_diff_update_1']:.3f}% / {100 * x['rel_diff_update_10']:.3f}% | "
                             f"{first if first is not None else 'none'} | {x['gate_corr']:.4f} | "
                             f"{x['max_abs_gate_diff']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
