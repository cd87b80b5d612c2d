"""Profile-driven speed levers of a CHG pass on SmolLM2-135M (issue 16), measured side by side.

    python benchmarks/levers.py                       # TransformerLens 4.x: the Bridge
    .venv-tl3/bin/python benchmarks/levers.py         # TransformerLens 3.x: HookedTransformer

One timed unit is one gated forward + backward to the gates (no weight gradients) over IOI rows
(last-token targets), the work of one fit update. Per repeat the variants run in turn (A B C A B C
...), so a loaded machine slows all of them alike; medians of ``--repeats``, with the load average.

Variants (each in the precision chg_lens picks here, ``autocast="auto"``, and in float32):

* ``tl``: chg_lens's own pass (``row_logprobs``: gates on ``hook_z``, unembedding at targets only),
  weights cast once under bf16;
* ``tl_percast``: the same with plain per-op autocast (bf16 only);
* ``hf``: plain Hugging Face with the same gates as a pre-hook on each ``o_proj`` and
  ``logits_to_keep=1``: the floor the TransformerLens hooks are measured against;
* ``joint``: chg_lens's pass with 2K configurations (the joint G+/G- stage) against K (G0): is a
  joint update ~2x a G0 update (linear) or worse (a cliff)?
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

import chg_lens
from chg_lens import models
from chg_lens.logprobs import row_logprobs


def hf_gated_loss(hf, n_heads: int, tokens, gates, autocast):
    """The reference's mechanism: gates scale each head's slice of o_proj's input."""
    K = gates.shape[0]
    batch = tokens.repeat(K, 1)
    handles = []
    for layer, block in enumerate(hf.model.layers):
        def pre(module, args, layer=layer):
            x = args[0]
            B, T, D = x.shape
            g = gates[:, layer].repeat_interleave(B // K, 0)[:, None, :, None]
            return ((x.reshape(B, T, n_heads, D // n_heads).float() * g).reshape(B, T, D).to(x.dtype),)
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logits = hf(batch[:, :-1], logits_to_keep=1).logits[:, -1].float()
        return -(logits.gather(-1, batch[:, -1:]).squeeze(-1) - logits.logsumexp(-1)).mean()
    finally:
        for h in handles:
            h.remove()


def timed(fn, n: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--masks", type=int, default=2, help="K: G0's configurations per pass (joint: 2K)")
    p.add_argument("--passes", type=int, default=3, help="timed passes per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = chg_lens.load_model("smollm2-135m-instruct")
    hf, _ = models._load_hf("smollm2-135m-instruct", torch.float32)
    for q in hf.parameters():
        q.requires_grad_(False)
    train, _ = chg_lens.tasks.ioi(model, n_prompts=64, seed=0)
    last = train.loss_mask.float().argmax(1)  # IOI: one target per row; rows of one length, so plain HF can
    common = torch.mode(last).values           # score the last position with logits_to_keep=1 too
    rows = (last == common).nonzero().flatten()[: args.rows]
    width = int(train.loss_mask[rows].any(0).nonzero().max()) + 1
    tokens, mask = train.tokens[rows, :width], train.loss_mask[rows, :width]
    last_target = bool((mask.sum(1) == 1).all() and mask[:, -1].all())
    L, H, K = models.n_layers(model), models.n_heads(model), args.masks
    auto = models.resolve_autocast(model, "auto")
    print(f"TransformerLens {models.TL_VERSION}; precision here: {models.describe_precision(model, 'auto')}; "
          f"rows {args.rows} x {width} tokens, K={K}; load {os.getloadavg()[0]:.1f}", flush=True)

    def chg_pass(k, mode):
        def run():
            g = torch.rand(k, L, H, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            row_logprobs(model, tokens, mask, g, autocast=mode).nll.sum().backward()
        return run

    def hf_pass(k, bf16):
        def run():
            g = torch.rand(k, L, H, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            hf_gated_loss(hf, H, tokens, g, bf16).backward()
        return run

    precisions = [("fp32", None)] + ([("bf16", "bf16")] if auto else [])
    times: dict[str, list[float]] = {}
    loads: list[float] = []
    for r in range(args.repeats):
        for pname, mode in precisions:
            with models.frozen(model):
                with models.cast_weights_once(model, mode):
                    times.setdefault(f"tl_{pname}", []).append(timed(chg_pass(K, mode), args.passes))
                    times.setdefault(f"joint_{pname}", []).append(timed(chg_pass(2 * K, mode), args.passes))
                if mode:
                    times.setdefault(f"tl_percast_{pname}", []).append(timed(chg_pass(K, mode), args.passes))
            if last_target:
                with models.cast_weights_once(hf, mode):
                    times.setdefault(f"hf_{pname}", []).append(timed(hf_pass(K, mode), args.passes))
        loads.append(os.getloadavg()[0])
        print("repeat", r, {k: round(v[-1], 3) for k, v in times.items()}, f"load {loads[-1]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("median seconds per pass:", {k: round(v, 3) for k, v in med.items()})
    for pname, _ in precisions:
        line = [f"{pname}:"]
        if f"hf_{pname}" in med:
            line.append(f"TransformerLens pass / plain HF = {med[f'tl_{pname}'] / med[f'hf_{pname}']:.2f}")
        line.append(f"joint (2K) / G0 (K) = {med[f'joint_{pname}'] / med[f'tl_{pname}']:.2f}")
        if f"tl_percast_{pname}" in med:
            line.append(f"per-op cast / cast once = {med[f'tl_percast_{pname}'] / med[f'tl_{pname}']:.2f}")
        print("  ".join(line))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tl_version": models.TL_VERSION, "times": times, "median": med, "loads": loads,
                       "rows": args.rows, "width": width, "masks": K}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
