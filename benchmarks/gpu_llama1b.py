"""GPU benchmark (UNMEASURED so far: no GPU was lent when it was written): the paper's setting on a
random-weight Llama-3.2-1B-shaped model, chg_lens at its defaults (``autocast="auto"``: bf16 mixed
precision with the weights cast once on a GPU with native bf16) vs the reference, and chg_lens
against the FLOP bound (printed as "x the FLOP bound" and "% of peak" per case).

    bash benchmarks/setup_reference.sh /tmp/venv-ref      # on the GPU machine, a CUDA torch
    python benchmarks/gpu_llama1b.py --device cuda        # ~10 min on an H100
    python benchmarks/gpu_llama1b.py --device cpu --tiny  # a smoke test of the script itself

The model is ``LlamaForCausalLM(LlamaConfig(...))`` with Llama-3.2-1B's shapes (16 layers, 32 query
/ 8 key-value heads, d_model 2048, MLP 8192, vocabulary 128,256, tied embeddings) and random
weights, saved to a folder both sides load. Rows are random tokens: ``last`` (24 tokens, the last
one a target) and ``long`` (256 tokens, the last 128 targets). The paper's setting is batch 64 and
1,500 updates (500 G0 + 500 G+ + 500 G-); this script times ``--updates`` updates per case and
extrapolates a full fit from them (chg_lens fits G+ and G- in one joint pass of 2K configurations,
so its full fit is 500 updates at K plus 500 at 2K; the reference's is 1,500 at K).

FLOP bound per update: (forward + input-gradient backward) = 4 * P * tokens * K with P the
non-embedding parameters, plus 4 * d_model * vocab per unembedded position (chg_lens: target
positions only), at the GPU's dense bf16 peak (``--peak-tflops``, 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_reference import run_worker  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                max_position_embeddings=2048, rope_theta=500000.0)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512)


def make_model(folder: Path, shape: dict) -> int:
    """Random-weight Llama saved (with a tokenizer-free config) to ``folder``; returns P (non-embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, torch_dtype="float32"))
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0", pad_token="t1", bos_token="t2", eos_token="t3")
    tok.save_pretrained(folder)
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def make_rows(path: Path, n: int, pos: int, targets: int, vocab: int) -> Path:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (n, pos), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, pos - targets:] = True
    torch.save({"tokens": tokens, "loss_mask": mask, "lengths": torch.full((n,), pos), "pad_token_id": 1}, path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: test the script, not the GPU")
    p.add_argument("--ref-python", default=os.environ.get("CHG_REF_PYTHON", "/tmp/venv-ref/bin/python"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--masks", type=int, nargs="*", default=[1, 10])
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default=str(HERE / "results" / "gpu_llama1b.json"))
    args = p.parse_args()
    shape = TINY if args.tiny else LLAMA_1B
    results = {"device": args.device, "shape": shape, "batch": args.batch, "cases": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        P = make_model(tmp / "model", shape)
        cases = {"last": make_rows(tmp / "last.pt", 4 * args.batch, 24, 1, shape["vocab_size"]),
                 "long": make_rows(tmp / "long.pt", 4 * args.batch, 256, 128, shape["vocab_size"])}
        for name, data in cases.items():
            pos, tgt = (24, 1) if name == "last" else (256, 128)
            for k in args.masks:
                runs = {"ref": [], "ours": []}
                for r in range(args.repeats):
                    kw = dict(mode="stage", model=tmp / "model", data=data, masks=k, batch=args.batch,
                              updates=args.updates, warmup=2, device=args.device)
                    runs["ref"].append(run_worker(args.ref_python, "ref", tmp, f"r{r}", **kw))
                    runs["ours"].append(run_worker(sys.executable, "ours", tmp, f"o{r}", autocast="auto", **kw))
                # stage mode: one entry per case in "cases" (here one case per process)
                med = {s: sorted(x["cases"][0]["updates_per_s"] for x in v)[len(v) // 2] for s, v in runs.items()}
                tokens = args.batch * k * (pos - 1)
                flop_ours = 4 * P * tokens + 4 * shape["hidden_size"] * shape["vocab_size"] * args.batch * k * tgt
                bound_s = flop_ours / (args.peak_tflops * 1e12)
                row = {"case": name, "masks": k, "ref_updates_per_s": med["ref"], "ours_updates_per_s": med["ours"],
                       "ratio": med["ours"] / med["ref"], "flop_bound_s_per_update": bound_s,
                       "ours_vs_bound": (1 / med["ours"]) / bound_s,
                       "ours_percent_of_peak": 100 * bound_s * med["ours"],
                       "ours_precision": runs["ours"][-1]["cases"][0].get("precision"),
                       "ref_full_fit_min_est": 1500 / med["ref"] / 60,
                       "ours_full_fit_min_est_upper": 1500 / med["ours"] / 60,
                       "cuda_peak_mib": {s: v[-1].get("cuda_peak_mib") for s, v in runs.items()}}
                results["cases"].append(row)
                print(json.dumps(row), flush=True)
                print(f"{name}, {k} masks: chg_lens {med['ours']:.2f} upd/s ({row['ours_precision']}), "
                      f"{row['ours_vs_bound']:.1f}x the FLOP bound ({row['ours_percent_of_peak']:.1f}% of "
                      f"{args.peak_tflops:.0f} TFLOP/s); reference {med['ref']:.2f} upd/s; ratio {row['ratio']:.2f}x",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
