"""GPU smoke test: every chg_lens path on a real model, in bf16 and fp32, one PASS/FAIL line each.

    make gpu-smoke                                   # CUDA, SmolLM2-135M-Instruct, bf16 + fp32 (< 5 min)
    python benchmarks/gpu_smoke.py --device cuda:1   # another GPU
    python benchmarks/gpu_smoke.py --device cpu --tiny   # proves the script itself on a CPU (tiny random model)

Paths: fit with checkpoint + resume (interrupted mid-fit, resumed, equal to an uninterrupted fit),
contrastive fit, head sweep with mean ablation, activation patching, explain recording, the HTML
report; then bf16 against fp32 on the same rows. Each path also checks that what it returns is
finite and that the activations it recorded lived on the requested device. Exit status: 0 when
every path passed, 1 when one failed, 2 when the requested CUDA device is not available (the
script says so instead of silently running on the CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import chg_lens  # noqa: E402
from chg_lens import ablation, models, patching  # noqa: E402


def tiny_model(dtype):
    """A random 2-layer Llama with the GPT-2 tokenizer from the shared data folder (for --tiny)."""
    import os

    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    shared = Path(os.environ.get("CHG_LENS_SHARED_DATA", REPO.parent / "shared" / "data"))
    tok = GPT2TokenizerFast.from_pretrained(str(shared / "tokenizers" / "gpt2"))
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=8)
    return LlamaForCausalLM(cfg), tok


def load(args, dtype: str):
    if args.tiny:
        hf, tok = tiny_model(dtype)
        return models.load_model(hf, tokenizer=tok, device=args.device, dtype=dtype)
    return models.load_model(args.model, device=args.device, dtype=dtype)


def finite(*tensors) -> None:
    for t in tensors:
        assert torch.isfinite(torch.as_tensor(t, dtype=torch.float32)).all(), "non-finite result"


class Recorder:
    """Remembers the device of every z a hook saw (proves the activations ran on the device)."""

    def __init__(self, model):
        self.devices: set[str] = set()
        self.model, self.real = model, model.run_with_hooks

    def __enter__(self):
        def run(*a, fwd_hooks=(), **k):
            def spy(fn):
                def hook(z, hook):
                    self.devices.add(str(z.device))
                    return fn(z, hook)
                return hook
            return self.real(*a, fwd_hooks=[(n, spy(f)) for n, f in fwd_hooks], **k)
        self.model.run_with_hooks = run
        return self

    def __exit__(self, *exc):
        del self.model.run_with_hooks


def paths(model, args, work: Path, size: dict):
    train, val = chg_lens.tasks.ioi(model, n_prompts=size["prompts"], seed=0)
    other, _ = chg_lens.tasks.ioi(model, n_prompts=size["prompts"], seed=1)
    kw = dict(n_seeds=2, updates=size["updates"], reg_updates=size["updates"], batch_size=8, progress=False)

    def fit_checkpoint_resume():
        import chg_lens.fitting as fitting

        whole = chg_lens.fit_chg(model, train, **kw)
        real, calls = fitting.batch_rows, {"n": 0}

        def dying(*a):
            calls["n"] += 1
            if calls["n"] == size["updates"] + 2:  # inside the regularised stage
                raise KeyboardInterrupt
            return real(*a)

        fitting.batch_rows = dying
        try:
            chg_lens.fit_chg(model, train, checkpoint_dir=work / "ck", checkpoint_every=2, **kw)
            raise AssertionError("the interruption did not happen")
        except KeyboardInterrupt:
            pass
        finally:
            fitting.batch_rows = real
        resumed = chg_lens.fit_chg(model, train, checkpoint_dir=work / "ck", checkpoint_every=2,
                                   validation=val, **kw)
        for k in whole.logits:
            finite(resumed.logits[k])
            diff = float((resumed.logits[k] - whole.logits[k]).abs().max())
            assert diff < 1e-2, f"resumed {k} differs from the uninterrupted fit by {diff:.3g}"
        resumed.save(work / "runs" / "fit")
        return f"resume matches ({len(whole.logits)} stages)"

    def contrastive():
        res = chg_lens.fit_contrastive(model, train, other, updates=size["updates"], batch_size=8, progress=False,
                                       check_pairs=False)
        finite(res.gates)
        return f"gates {tuple(res.gates.shape)}"

    def head_sweep_mean():
        means = ablation.mean_z(model, train)
        finite(*means.values())
        sweep = ablation.head_sweep(model, val, method="mean", reference=train,
                                    heads=[(0, 0), (models.n_layers(model) - 1, 1)])
        finite(sweep.frame["delta_logprob"].to_numpy())
        return f"{len(sweep.frame)} heads"

    def patch():
        clean, corrupted = chg_lens.tasks.ioi_pairs(model, n_prompts=8, seed=0)
        res = patching.patch_heads(model, clean, corrupted, heads=[(0, 0), (models.n_layers(model) - 1, 1)],
                                   batch_size=8)
        finite(res.baseline["clean"], res.baseline["corrupted"])
        return f"clean {res.baseline['clean']:.2f} corrupted {res.baseline['corrupted']:.2f}"

    def explain_record():
        import pandas as pd

        from chg_lens.explain.record import record_to_parquet
        from chg_lens.explain.sources import Windows

        tokens = train.tokens[:8, :12]
        path = record_to_parquet(model, Windows(tokens=tokens, source=["ioi"] * len(tokens)),
                                 [(0, 1), (models.n_layers(model) - 1, 0)], work / "raw", progress=False)
        frame = pd.read_parquet(path)
        assert len(frame) > 0
        return f"{len(frame)} rows"

    def report():
        from chg_lens.report import write_report

        out = write_report(work / "runs")
        assert out["html"].stat().st_size > 1000
        return f"{out['html'].stat().st_size // 1024} KiB html"

    return [("fit+checkpoint+resume", fit_checkpoint_resume), ("contrastive", contrastive),
            ("head sweep (mean ablation)", head_sweep_mean), ("patching", patch),
            ("explain recording", explain_record), ("report", report)], val


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of --model (CPU check)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"NO CUDA: torch {torch.__version__} sees no CUDA device, so the GPU smoke test did not run. "
              "Run it on a machine with a GPU, or check the script itself with --device cpu --tiny.")
        return 2
    if args.device.startswith("cuda"):
        print(f"device {args.device}: {torch.cuda.get_device_name(torch.device(args.device))}")
    size = {"prompts": 32, "updates": 6} if args.tiny else {"prompts": 48, "updates": 20}
    failed, t_start, ref = [], time.time(), {}
    warnings.filterwarnings("ignore")
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            try:
                model = load(args, dtype)
            except Exception as err:  # noqa: BLE001 - a smoke test reports, it does not stop
                print(f"FAIL  [{dtype}] load: {type(err).__name__}: {err}")
                failed.append((dtype, "load"))
                continue
            print(f"      [{dtype}] loaded {models.model_name(model)} on {models.device(model)} in {time.time() - t0:.0f}s")
            steps, val = paths(model, args, Path(tmp), size)
            for name, fn in steps:
                t0 = time.time()
                try:
                    with Recorder(model) as rec:
                        info = fn()
                    want = torch.device(args.device).type
                    assert not rec.devices or all(d.startswith(want) for d in rec.devices), \
                        f"activations ran on {sorted(rec.devices)}, not {args.device}"
                    print(f"PASS  [{dtype}] {name}: {info} ({time.time() - t0:.1f}s)", flush=True)
                except Exception as err:  # noqa: BLE001
                    failed.append((dtype, name))
                    print(f"FAIL  [{dtype}] {name}: {type(err).__name__}: {err}", flush=True)
                    traceback.print_exc(limit=3)
            ref[dtype] = chg_lens.evaluate(model, val).logprob_mean.mean().item()
            del model
    if len(ref) > 1:
        a, b = list(ref.values())[:2]
        ok = abs(a - b) < 0.1 + 0.05 * abs(b)
        print(f"{'PASS' if ok else 'FAIL'}  dtypes agree: mean target log-prob " +
              ", ".join(f"{k} {v:.4f}" for k, v in ref.items()))
        if not ok:
            failed.append(("all", "dtypes agree"))
    print(f"{'ALL PASSED' if not failed else f'{len(failed)} FAILED'} in {time.time() - t_start:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
