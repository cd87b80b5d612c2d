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
* ``no_last_block``: the same pass with the last block left out (stopped at its input, unembedded
  there): an upper bound on what skipping the last block's work at positions that predict no target
  could save (that lever can only save part of this: keys and values are needed at every position);
* ``layer0_attn``: layer 0's attention up to ``hook_z`` for the K configurations' rows, forward only
  (nothing before the gates needs a gradient): an upper bound on sharing it across configurations
  (computed once instead of K times, it would save (K-1)/K of this);
* ``mlp_compiled`` (TransformerLens 4.x): chg_lens's pass with ``torch.compile`` on each block's inner
  Hugging Face MLP (``block.mlp.original_component``; compiling the whole Bridge block fails in
  dynamo on TransformerLens 4.3), measured last, after a compile whose seconds are printed. This
  bypasses the TransformerLens hook points inside the MLP, so it is measured here, not used.
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
from chg_lens import gates as gates_mod
from chg_lens import models
from chg_lens.scoring import row_logprobs


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

    def no_last_block_pass(k, mode):
        rows_t, pos_t = mask[:, 1:].nonzero(as_tuple=True)

        def run():
            g = torch.rand(k, L, H, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            hooks = gates_mod.gate_hooks(model, g)
            with models.autocast(model, mode):
                resid = models.run_until(model, tokens.repeat(k, 1), models.resid_pre_hook_name(L - 1), hooks)
                resid = resid.reshape(k, -1, *resid.shape[1:])[:, rows_t, pos_t]
                logits = models.unembed(model, resid).float()
            logits.logsumexp(-1).sum().backward()
        return run

    def layer0_attn_pass(k, mode):
        def run():
            with torch.no_grad(), models.autocast(model, mode):
                models.run_until(model, tokens.repeat(k, 1), models.z_hook_name(0))
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
                    times.setdefault(f"no_last_block_{pname}", []).append(timed(no_last_block_pass(K, mode), args.passes))
                    times.setdefault(f"layer0_attn_{pname}", []).append(timed(layer0_attn_pass(K, mode), args.passes))
                if mode:
                    times.setdefault(f"tl_percast_{pname}", []).append(timed(chg_pass(K, mode), args.passes))
            if last_target:
                with models.cast_weights_once(hf, mode):
                    times.setdefault(f"hf_{pname}", []).append(timed(hf_pass(K, mode), args.passes))
        loads.append(os.getloadavg()[0])
        print("repeat", r, {k: round(v[-1], 3) for k, v in times.items()}, f"load {loads[-1]:.1f}", flush=True)
    inner = [getattr(getattr(b, "mlp", None), "original_component", None) for b in model.blocks]
    if all(m is not None for m in inner):  # last: compiled MLPs stay compiled for the rest of the process
        originals = [m.forward for m in inner]
        for m in inner:
            m.forward = torch.compile(m.forward, dynamic=True)
        with models.frozen(model):
            t0 = time.perf_counter()
            chg_pass(K, None)()
            print(f"torch.compile of {len(inner)} MLPs: first pass {time.perf_counter() - t0:.1f} s", flush=True)
            for _ in range(args.repeats):
                times.setdefault("mlp_compiled_fp32", []).append(timed(chg_pass(K, None), args.passes))
                times.setdefault("tl_fp32_again", []).append(0.0)
                for m, f in zip(inner, originals):
                    m.forward = f
                times["tl_fp32_again"][-1] = timed(chg_pass(K, None), args.passes)
                for m in inner:
                    m.forward = torch.compile(m.forward, dynamic=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("median seconds per pass:", {k: round(v, 3) for k, v in med.items()})
    for pname, _ in precisions:
        line = [f"{pname}:"]
        if f"hf_{pname}" in med:
            line.append(f"TransformerLens pass / plain HF = {med[f'tl_{pname}'] / med[f'hf_{pname}']:.2f}")
        line.append(f"joint (2K) / G0 (K) = {med[f'joint_{pname}'] / med[f'tl_{pname}']:.2f}")
        tl = med[f"tl_{pname}"]
        line.append(f"last block's share of a pass <= {(tl - med[f'no_last_block_{pname}']) / tl:.1%}")
        line.append(f"sharing layer 0's attention saves <= {(K - 1) / K * med[f'layer0_attn_{pname}'] / tl:.1%}")
        if f"tl_percast_{pname}" in med:
            line.append(f"per-op cast / cast once = {med[f'tl_percast_{pname}'] / med[f'tl_{pname}']:.2f}")
        print("  ".join(line))
    if "mlp_compiled_fp32" in med:
        print(f"fp32: compiled MLPs / eager = {med['mlp_compiled_fp32'] / med['tl_fp32_again']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tl_version": models.TL_VERSION, "times": times, "median": med, "loads": loads,
                       "rows": args.rows, "width": width, "masks": K}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
