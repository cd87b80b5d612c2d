"""Single-head ablation sweep: one pass per head vs batched configurations vs batched + prefix reuse.

    python benchmarks/ablation_sweep.py                       # SmolLM2-135M-Instruct (offline) and a tiny model
    python benchmarks/ablation_sweep.py --model tiny --n-prompts 16

Every mode scores the same rows (IOI prompts) under the same single-head zero-ablation configs and
must give the same numbers (checked); the table shows wall time and the speed-up over one pass per head.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import chg_lens
from chg_lens import ablation, gates, models
from chg_lens.scoring import row_logprobs


def tiny_model():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import gpt2_tokenizer, tiny_llama_hf  # the test suite's tiny Llama with the GPT-2 tokenizer

    tok = gpt2_tokenizer()
    return models.load_model(tiny_llama_hf(len(tok), n_layers=4, n_heads=4, n_kv_heads=4, d_head=16), tokenizer=tok)


@torch.no_grad()
def one_pass_per_head(model, data, heads):
    out = []
    for l, h in heads:
        g = gates.ones(model)
        g[l, h] = 0.0
        out.append(row_logprobs(model, data.tokens, data.loss_mask, g).logprob_sum.mean())
    return torch.stack(out)


def timed(fn, repeats: int):
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def bench(name: str, model, n_prompts: int, layers: list[int] | None, repeats: int, max_rows: int) -> list[str]:
    torch.set_grad_enabled(False)
    data = chg_lens.tasks.ioi_pairs(model, n_prompts=n_prompts, seed=0)[0]
    L, H = models.n_layers(model), models.n_heads(model)
    heads = [(l, h) for l in (layers if layers is not None else range(L)) for h in range(H)]
    kw = dict(heads=heads, batch_size=len(data), rows_per_pass=max_rows)
    t_one, v_one = timed(lambda: one_pass_per_head(model, data, heads), repeats)
    t_bat, v_bat = timed(lambda: torch.tensor(ablation.head_sweep(model, data, prefix_reuse=False, **kw).frame.logprob.values), repeats)
    t_pre, v_pre = timed(lambda: torch.tensor(ablation.head_sweep(model, data, prefix_reuse=True, **kw).frame.logprob.values), repeats)
    err = max(float((v_one.double() - v_bat).abs().max()), float((v_one.double() - v_pre).abs().max()))
    return [f"| {name} | TL {models.TL_VERSION} | {len(heads)} heads x {len(data)} prompts | {t_one:.2f} s | "
            f"{t_bat:.2f} s ({t_one / t_bat:.1f}x) | {t_pre:.2f} s ({t_one / t_pre:.1f}x) | {err:.1e} |"]


README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- ablation_sweep rows: start -->", "<!-- ablation_sweep rows: end -->"
HEADER = ["| model | TransformerLens | sweep | one pass per head | batched | batched + prefix reuse | max abs diff |",
          "| --- | --- | --- | --- | --- | --- | --- |"]


def write_rows(rows: list[str], readme: Path = README) -> None:
    """Put ``rows`` into the table between the markers in benchmarks/README.md, replacing the row of the
    same model and TransformerLens version (other rows, and every other section, are kept)."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no ablation-sweep markers ({START} ... {END})")
    head, rest = text.split(START, 1)
    body, tail = rest.split(END, 1)
    old = [l for l in body.strip().splitlines() if l.startswith("| ") and l not in HEADER]
    key = lambda row: "|".join(row.split("|")[1:3])
    new_keys = {key(r) for r in rows}
    kept = [r for r in old if key(r) not in new_keys]
    table = "\n".join(HEADER + kept + rows)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "tiny", "both"], default="both")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--layers", default=None, help="SmolLM2: only heads of these layers, e.g. '0-29' or '0,10,20,29' (default all)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-rows-per-pass", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write-readme", action="store_true", help="put the rows into benchmarks/README.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    layers = None
    if a.layers:
        layers = []
        for part in a.layers.split(","):
            lo, _, hi = part.partition("-")
            layers += list(range(int(lo), int(hi or lo) + 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print("| model | TransformerLens | sweep | one pass per head | batched | batched + prefix reuse | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    if a.model in ("tiny", "both"):
        rows += bench("tiny Llama (4 layers x 4 heads, GPT-2 vocab)", tiny_model(), a.n_prompts, None, max(a.repeats, 3),
                      a.max_rows_per_pass)
        print(rows[-1], flush=True)
    if a.model in ("smollm2", "both"):
        model = chg_lens.load_model("smollm2-135m-instruct")
        rows += bench("SmolLM2-135M-Instruct", model, a.n_prompts, layers, a.repeats, a.max_rows_per_pass)
        print(rows[-1], flush=True)
    if a.write_readme:
        write_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
