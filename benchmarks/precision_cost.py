"""What bf16 autocast costs a measurement in accuracy (issue 28): SmolLM2 on IOI.

Measurements in chg_lens default to ``autocast="off"`` (the model's own dtype). This script measures
what ``autocast="bf16"`` changes, so a caller who asks for it for a large sweep knows the price:

* per-row target log-prob (``chg_lens.evaluate``) on the IOI validation rows: bf16 minus float32,
  max and mean absolute error, and against the Hugging Face-equal float32 value;
* a single-head mean-ablation sweep (``ablation.head_sweep``): the largest error of ``delta_logprob``,
  the Spearman rank correlation of the two rankings and the overlap of their top-10 heads;
* activation patching (``patching.ioi_patching``): the same three numbers for the effects.

Accuracy numbers do not depend on load; the seconds printed beside them do (run on a quiet machine
to compare speed). Prints the CPU and whether it has native bf16.

    PYTHONPATH=$PWD .venv-tl4/bin/python benchmarks/precision_cost.py            # SmolLM2, 64 IOI prompts
    PYTHONPATH=$PWD .venv-tl4/bin/python benchmarks/precision_cost.py --n-prompts 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def cpu_line() -> str:
    from chg_lens import models

    name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = sorted({"avx512_bf16", "amx_bf16"} & models.cpu_flags())
    return f"{name}, {torch.get_num_threads()} threads, native bf16 flags: {', '.join(flags) or 'none'}"


def rank_agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Spearman correlation and top-k overlap of two head scores (flattened, higher = first)."""
    from scipy import stats

    a, b = a.flatten().double(), b.flatten().double()
    top = lambda t: set(torch.argsort(t, descending=True)[:k].tolist())
    return {"spearman": float(stats.spearmanr(a.numpy(), b.numpy()).statistic),
            f"top{k}_overlap": len(top(a) & top(b)) / k, "max_abs_error": float((a - b).abs().max())}


def main() -> None:
    import chg_lens
    from chg_lens import ablation, patching

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args()
    print(cpu_line())
    model = chg_lens.load_model(a.model)
    train, val = chg_lens.tasks.ioi(model, n_prompts=a.n_prompts * 2)
    val = val if len(val) >= a.n_prompts else train.subset(range(a.n_prompts))
    out: dict = {"model": a.model, "cpu": cpu_line(), "python": platform.python_version(), "rows": len(val)}

    t = {}
    for mode in ("off", "bf16"):
        t0 = time.perf_counter()
        out[f"evaluate_{mode}"] = chg_lens.evaluate(model, val, autocast=mode).logprob_sum[0]
        t[f"evaluate_{mode}"] = time.perf_counter() - t0
    err = (out.pop("evaluate_bf16") - out.pop("evaluate_off")).abs()
    out["evaluate"] = {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                       "rows_off_by_0.01": int((err > 0.01).sum())}
    print(f"evaluate, {len(val)} IOI rows: per-row target log-prob bf16 - float32: max {err.max():.4f}, "
          f"mean {err.mean():.4f} nats; {int((err > 0.01).sum())} rows off by > 0.01")

    sweeps = {}
    for mode in ("off", "bf16"):
        t0 = time.perf_counter()
        sweeps[mode] = ablation.head_sweep(model, val, method="mean", reference=train, autocast=mode)
        t[f"head_sweep_{mode}"] = time.perf_counter() - t0
    # importance = how much ablating the head lowers the log-prob
    out["head_sweep"] = rank_agreement(-sweeps["bf16"].tensor("delta_logprob"), -sweeps["off"].tensor("delta_logprob"))
    print("head_sweep (mean ablation, delta_logprob): " + ", ".join(f"{k} {v:.4f}" for k, v in out["head_sweep"].items()))

    patches = {}
    for mode in ("off", "bf16"):
        t0 = time.perf_counter()
        patches[mode] = patching.ioi_patching(model, n_prompts=min(a.n_prompts, 32), autocast=mode)
        t[f"patching_{mode}"] = time.perf_counter() - t0
    out["patching"] = rank_agreement(patches["bf16"].effects, patches["off"].effects)
    scale = float(patches["off"].effects.abs().max())
    out["patching"]["max_effect"] = scale
    print("ioi_patching (logit difference): " + ", ".join(f"{k} {v:.4f}" for k, v in out["patching"].items()))
    out["seconds"] = t
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
