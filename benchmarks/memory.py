"""Peak memory of a CHG fit with and without micro-batches (``grad_accum``).

Each setting runs in its own process; a thread samples the process's resident memory
(/proc/self/statm) every 5 ms during ``fit_chg``, and the report gives the peak above the
resident memory at the start of the fit (the model and data are already loaded), plus the
process's lifetime peak (``ru_maxrss``) and the time per update.

    python benchmarks/memory.py                                  # SmolLM2 (offline), grad_accum 1 and 4
    python benchmarks/memory.py --grad-accum 1 2 8 --batch-size 32 --n-seeds 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(args) -> dict:
    import torch

    import chg_lens

    torch.set_num_threads(args.threads)
    model = chg_lens.load_model(args.model)
    train, _ = chg_lens.tasks.get_task(args.task)(model, n_prompts=args.n_prompts)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    start = rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    chg_lens.fit_chg(model, train, n_seeds=args.n_seeds, updates=args.updates, reg_updates=args.updates,
                     batch_size=args.batch_size, grad_accum=args.grad_accum, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    return {"grad_accum": args.grad_accum, "batch_size": args.batch_size, "n_seeds": args.n_seeds,
            "updates": 2 * args.updates, "fit_peak_above_start_mib": (peak[0] - start) / 2**20,
            "rss_at_fit_start_mib": start / 2**20, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds_per_update": seconds / (2 * args.updates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="ioi")
    p.add_argument("--n-prompts", type=int, default=40)
    p.add_argument("--n-seeds", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--updates", type=int, default=2, help="per stage (G0, then G+/G-)")
    p.add_argument("--grad-accum", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.grad_accum = args.grad_accum[0]
        print(json.dumps(one(args)))
        return
    rows = []
    for ga in args.grad_accum:
        cmd = [sys.executable, __file__, "--one", "--grad-accum", str(ga)] + [
            x for k in ("model", "task", "n_prompts", "n_seeds", "batch_size", "updates", "threads")
            for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'grad_accum':>10} {'fit peak above start (MiB)':>27} {'ru_maxrss (MiB)':>16} {'s/update':>9}")
    for r in rows:
        print(f"{r['grad_accum']:>10} {r['fit_peak_above_start_mib']:>27.1f} {r['ru_maxrss_mib']:>16.1f} "
              f"{r['seconds_per_update']:>9.2f}")


if __name__ == "__main__":
    main()
