"""Attribution patching vs activation patching on SmolLM2-135M-Instruct / IOI, side by side (issue 26).

    PYTHONPATH=. python benchmarks/attribution_speed.py                          # SmolLM2, 32 IOI pairs, all heads
    PYTHONPATH=. python benchmarks/attribution_speed.py --n-prompts 64 --threads 2 --json benchmarks/results/atp.json
    PYTHONPATH=. python benchmarks/attribution_speed.py --model tiny             # the plumbing, on a tiny random model

Both sides score the same IOI pairs (ABC corruption, logit difference IO - S) in the model's own dtype
(``autocast="off"``, the measurement default): ``patching.patch_heads`` patches every head at every
position, one head per configuration, many configurations per pass (the exact indirect effects);
``attribution.attribute_heads`` gets every head's effect from one forward and one backward pass per batch
(AtP, the linear approximation). Both sides first run untimed on two pairs (warm-up: kernel selection,
first-touch), then ``--repeats`` timed runs each (``time.perf_counter``; the best is reported, every run is in the JSON). Printed:
the seconds of each, the ratio (patching / attribution; the target is >= 30x), the Spearman rank correlation
of their effects over heads (signed, and of ``|effect|``), the top-10 overlap by ``|effect|``, the CPU model,
its native-bf16 flags, the threads and the load average before and after (a loaded machine inflates both
sides; run it on a quiet one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chg_lens  # noqa: E402
from chg_lens import models  # noqa: E402
from chg_lens.attribution import attribute_heads  # noqa: E402
from chg_lens.compare import spearman, top_k_overlap  # noqa: E402
from chg_lens.patching import patch_heads  # noqa: E402


def tiny_model():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import gpt2_tokenizer, tiny_llama_hf  # the test suite's tiny Llama with the GPT-2 tokenizer

    tok = gpt2_tokenizer()
    return models.load_model(tiny_llama_hf(len(tok), n_layers=4, n_heads=4, n_kv_heads=4, d_head=16), tokenizer=tok)


def machine(threads: int) -> dict:
    """The CPU model, its bf16 flags (chg_lens's view: ``models.cpu_native_bf16``), threads, load."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = models.cpu_flags()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "bf16_flags": sorted(f for f in flags if "bf16" in f or "amx" in f),
            "native_bf16": models.cpu_native_bf16(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformer_lens": models.TL_VERSION,
            "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Seconds of ``repeats`` runs of ``fn``, and the last value."""
    value, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return times, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model name, or 'tiny' (default: %(default)s)")
    p.add_argument("--n-prompts", type=int, default=32, help="IOI pairs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per pass, both sides (default: %(default)s)")
    p.add_argument("--rows-per-pass", type=int, default=256, help="patching: rows (configs x prompts) per pass")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side after the warm-up (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="append one JSON record to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = tiny_model() if a.model == "tiny" else chg_lens.load_model(a.model, device=a.device)
    clean, corrupted = chg_lens.tasks.ioi_pairs(model, n_prompts=a.n_prompts, seed=0)
    L, H = models.n_layers(model), models.n_heads(model)
    info = machine(torch.get_num_threads())
    print(f"{a.model}: {L} layers x {H} heads, {len(clean)} IOI pairs, {clean.tokens.shape[1]} tokens; "
          f"{info['cpu']}, {info['threads']} threads, bf16 flags {info['bf16_flags'] or 'none'} "
          f"(native bf16: {info['native_bf16']}), GPU {info['gpu']}")
    load0 = os.getloadavg()
    kw = dict(batch_size=a.batch_size, metric="logit_diff", autocast="off")
    few = torch.arange(min(2, len(clean)))  # warm-up on two pairs: kernel selection and first-touch, both sides
    patch_heads(model, clean.subset(few), corrupted.subset(few), heads=[(0, 0), (L - 1, H - 1)], **kw)
    attribute_heads(model, clean.subset(few), corrupted.subset(few), **kw)
    t_patch, patched = timed(lambda: patch_heads(model, clean, corrupted, positions="all",
                                                 rows_per_pass=a.rows_per_pass, **kw), a.repeats)
    t_attr, attributed = timed(lambda: attribute_heads(model, clean, corrupted, positions="all", **kw), a.repeats)
    load1 = os.getloadavg()
    exact, approx = patched.effects, attributed.effects
    record = {
        "model": a.model, "n_layers": L, "n_heads": H, "n_prompts": len(clean), "tokens": int(clean.tokens.shape[1]),
        "batch_size": a.batch_size, "rows_per_pass": a.rows_per_pass,
        "patching_seconds": min(t_patch), "attribution_seconds": min(t_attr),
        "patching_runs": t_patch, "attribution_runs": t_attr, "ratio": min(t_patch) / min(t_attr),
        "spearman": spearman(exact, approx), "spearman_abs": spearman(exact.abs(), approx.abs()),
        "top10_overlap": top_k_overlap(exact.abs(), approx.abs(), 10),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1], **info,
    }
    print(f"| side | seconds |\n| --- | ---: |\n| activation patching (patch_heads, {L * H} heads, all positions) | "
          f"{record['patching_seconds']:.2f} |\n| attribution patching (attribute_heads, AtP) | "
          f"{record['attribution_seconds']:.2f} |")
    print(f"ratio {record['ratio']:.1f}x (target >= 30x); Spearman of the effects {record['spearman']:.3f} "
          f"(of |effect| {record['spearman_abs']:.3f}); top-10 overlap by |effect| {record['top10_overlap']:.2f}; "
          f"load average {record['loadavg_before'][0]} -> {record['loadavg_after'][0]}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
