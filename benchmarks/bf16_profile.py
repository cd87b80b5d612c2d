"""Where a bf16 fit pass spends its time on this CPU (issue 28, item 4).

One timed unit is one G0 update of a CHG fit at its defaults (``autocast="auto"``): the gated forward
and the backward to the gates over IOI rows, 2 seeds, batch 16 (SmolLM2-135M-Instruct). For 1 and 2
threads the script prints:

* seconds per update (median of ``--repeats``) and the achieved GFLOP/s of the useful work (forward +
  backward to the gates through every block at every token, unembedding at targets only: the same
  count as ``compare_reference.update_flops``) against this CPU's measured bf16 and float32 matrix
  product rates at the same thread count (``compare_reference.matmul_gflops``: a 1024^3 product, best of 5);
* a torch.profiler breakdown of one update by kind of op: matrix products, attention, norms,
  dtype casts and copies, element-wise, and the rest (hooks, Python), with their share.

    PYTHONPATH=$PWD .venv-tl4/bin/python benchmarks/bf16_profile.py [--repeats 5] [--json out.json]

Run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from compare_reference import matmul_gflops  # this CPU's 1024^3 product rate, the one the reference benchmark prints

KINDS = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_mkldnn", "mkldnn"),
    "attention": ("scaled_dot_product", "softmax", "_softmax", "flash"),
    "norm": ("rms_norm", "layer_norm", "norm", "rsqrt", "pow", "mean"),
    "cast/copy": ("_to_copy", "copy_", "to", "clone", "contiguous", "cat", "repeat", "expand", "index", "gather",
                  "where", "pad"),
    "elementwise": ("mul", "add", "sub", "div", "silu", "sigmoid", "neg", "exp", "tanh", "cos", "sin", "fill_",
                    "zero_", "sum", "clamp"),
}


def kind_of(name: str) -> str:
    op = name.split("::")[-1]
    for kind, keys in KINDS.items():
        if any(op == k or op.startswith(k + "_") or op.startswith(k) for k in keys):
            return kind
    return "other"


def useful_flops(model, tokens: torch.Tensor, mask: torch.Tensor, n_cfg: int) -> float:
    cfg = model.cfg
    d, L, V, H, dh = cfg.d_model, cfg.n_layers, cfg.d_vocab, cfg.n_heads, cfg.d_head
    kv = (getattr(cfg, "n_key_value_heads", None) or H) * dh
    block = d * H * dh * 2 + d * kv * 2 + 3 * d * cfg.d_mlp
    width = int(mask.any(dim=0).nonzero().max()) + 1
    rows = tokens.shape[0]
    fwd = 2 * rows * width * L * block + 4 * rows * L * width * width * d + 2 * int(mask[:, 1:].sum()) * d * V
    return 2 * fwd * n_cfg


def main() -> None:
    import chg_lens
    from chg_lens import models
    from chg_lens.scoring import row_logprobs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model = chg_lens.load_model(a.model)
    train, _ = chg_lens.tasks.ioi(model, n_prompts=128)
    tokens, mask = train.tokens[: a.batch], train.loss_mask[: a.batch]
    mode = models.resolve_autocast(model, "auto")
    print(f"precision: {models.describe_precision(model, 'auto')}; load average {os.getloadavg()[0]:.2f}")
    flops = useful_flops(model, tokens, mask, a.seeds)
    logits = torch.zeros(a.seeds, models.n_layers(model), models.n_heads(model))

    def update():
        g = torch.sigmoid(logits.clone().requires_grad_(True))  # gates from logits, as in a fit
        out = row_logprobs(model, tokens, mask, g, autocast=mode)
        out.nll.sum().backward()

    report = {"precision": models.describe_precision(model, "auto"), "gflop_per_update": flops / 1e9, "threads": {}}
    old = torch.get_num_threads()
    with models.frozen(model), models.cast_weights_once(model, mode):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            update()
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                update()
                times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            rate = matmul_gflops(threads)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                update()
            by_kind: dict[str, float] = {}
            total = 0.0
            for ev in prof.key_averages():
                if ev.key.startswith("aten::") or ev.key.startswith("mkldnn"):
                    by_kind[kind_of(ev.key)] = by_kind.get(kind_of(ev.key), 0.0) + ev.self_cpu_time_total
                    total += ev.self_cpu_time_total
            prof_total = sum(ev.self_cpu_time_total for ev in prof.key_averages())
            by_kind["other"] = by_kind.get("other", 0.0) + max(0.0, prof_total - total)
            shares = {k: v / prof_total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            report["threads"][threads] = {"s_per_update": s, "gflops": flops / s / 1e9, "matmul_gflops": rate,
                                          "share": shares,
                                          "top_ops": [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in top]}
            print(f"\n{threads} thread(s): {s:.3f} s/update, {flops / s / 1e9:.0f} GFLOP/s of useful work "
                  f"({flops / 1e9:.1f} GFLOP/update) = {100 * flops / s / 1e9 / rate['bf16']:.0f}% of this CPU's bf16 "
                  f"1024^3 product ({rate['bf16']:.0f} GFLOP/s; float32 {rate['fp32']:.0f})")
            print("  self time by kind: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()))
            for key, ms, count in report["threads"][threads]["top_ops"]:
                print(f"    {key:40s} {ms:8.1f} ms  x{count}")
    torch.set_num_threads(old)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
