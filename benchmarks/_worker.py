"""One measurement in its own process (clean peak memory): chg_lens or the reference.

Run by ``compare_reference.py``; the reference side runs under the reference's own virtual
environment and imports nothing from chg_lens. Inputs come from files the parent wrote:

* ``--model DIR``: a Hugging Face folder (SmolLM2-135M-Instruct dequantised from its GGUF once, or a
  random-weight model), loaded by both sides with ``AutoModelForCausalLM.from_pretrained``;
* ``--data FILE``: ``torch.save`` of a dict with ``tokens``, ``loss_mask``, ``pad_token_id`` and, for
  ``--mode equal``, ``init_logits`` and ``batches`` (row indices of every update of every stage).

Modes: ``stage`` times ``--updates`` unregularised updates after ``--warmup``; ``fit`` times a full
three-stage fit; ``equal`` runs a fit from given initial gates on given batches and writes its NLL
traces and gates. The result is one JSON object in ``--out`` (``equal`` also writes ``--out``.pt).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time

import torch


class PeakRSS:
    """Samples this process's resident memory every 5 ms; ``peak`` in MiB while active."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def cases(args) -> list[dict]:
    """``--cases`` (JSON list of {data, masks, batch}, run in order in this process) or the single case."""
    if args.cases:
        return json.loads(args.cases)
    return [{"data": args.data, "masks": args.masks, "batch": args.batch}]


def load_hf(folder: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------- reference
def disable_reference_autocast() -> None:
    """Run the reference in float32: its trainer always enters ``torch.amp.autocast(device_type)``,
    which is bf16 on CPU. In this process only, that call becomes a disabled autocast, so the
    reference does float32 work, the same work as chg_lens without autocast. Nothing else changes."""
    original = torch.amp.autocast

    def float32_autocast(device_type, *args, **kwargs):
        return original(device_type, *args, **{**kwargs, "enabled": False})

    torch.amp.autocast = float32_autocast
    torch.autocast = float32_autocast


def run_ref(args, data) -> dict:
    if args.autocast == "none":
        disable_reference_autocast()
    from causal_head_gating.core.trainer import CHGTrainer
    from causal_head_gating.data.datasets import MaskedSequenceDataset

    model = load_hf(args.model).to(args.device)
    ds = MaskedSequenceDataset(int(data["pad_token_id"]), input_ids=data["tokens"], loss_masks=data["loss_mask"])
    ds = ds.map(lambda t: t.to(args.device))  # the reference never moves batches itself

    class Trainer(CHGTrainer):
        """The reference trainer with chg_lens's learning-rate schedule (linear from start to end over
        updates - 1 steps) so that ``equal`` mode makes the same updates; speed is unaffected."""

        nll_log: list[float] = []

        def _get_loss(self, *a, **k):
            # The reference yields metrics["nll"] after its optimizer step has zeroed it (always 0.0
            # without gradient accumulation), so the NLL of every step is recorded here instead.
            loss, nll, l1 = super()._get_loss(*a, **k)
            self.nll_log.append(nll)
            return loss, nll, l1

        def _reset_optimizer(self, mask_logits, lr, end_lr, total_steps):
            self._optimizer = torch.optim.Adam([mask_logits], lr=lr)
            n = max(1, total_steps - 1)
            self._scheduler = torch.optim.lr_scheduler.LambdaLR(
                self._optimizer, lambda k: (lr + (end_lr - lr) * min(k, n) / n) / lr)

    common = dict(num_masks=args.masks, batch_size=args.batch, l1_weight=args.lam, lr=0.1, lr_end=0.01,
                  lr_reg=0.5, lr_reg_end=0.1)
    out: dict = {}
    if args.mode == "stage":
        out["cases"] = []
        for case in cases(args):
            d = torch.load(case["data"])
            cds = MaskedSequenceDataset(int(d["pad_token_id"]), input_ids=d["tokens"], loss_masks=d["loss_mask"])
            cds = cds.map(lambda t: t.to(args.device))
            tr = Trainer(model, cds, **{**common, "num_masks": case["masks"], "batch_size": case["batch"]})
            for _ in tr.fit_stage("none", args.warmup, show_progress=False):
                pass
            load = os.getloadavg()[0]
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                for _ in tr.fit_stage("none", args.updates, show_progress=False):
                    pass
                sec = time.perf_counter() - t0
            out["cases"].append({**case, "seconds": sec, "updates_per_s": args.updates / sec, "fit_peak_rss_mib": mem.peak,
                                 "load_avg": [load, os.getloadavg()[0]]})
            with open(args.out + ".partial", "w") as f:  # cases so far, for runs cut short
                json.dump(out, f)
            del tr
    elif args.mode == "fit":
        tr = Trainer(model, ds, **common)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            for _ in tr.fit(args.updates, args.reg_updates, verbose=False):
                pass
            sec = time.perf_counter() - t0
        out.update(seconds=sec, fit_peak_rss_mib=mem.peak)
    else:  # equal
        tr = Trainer(model, ds, grad_norm=None, **common)
        with torch.no_grad():
            tr.mask_logits.copy_(data["init_logits"])
        batches = data["batches"]
        order = [*batches["g0"], *batches["reg"], *batches["reg"]]  # none, positive (G+), negative (G-)
        tr.iterator = iter(ds.collate_fn([ds[int(i)] for i in idx]) for idx in order)
        for _ in tr.fit(args.updates, args.reg_updates, verbose=False):
            pass
        log, n, m = tr.nll_log, args.updates, args.reg_updates
        nll = {"g0": log[:n], "g_plus": log[n:n + m], "g_minus": log[n + m:n + 2 * m]}  # none, positive, negative
        assert len(log) == n + 2 * m, len(log)
        gates = tr.get_final_masks()
        torch.save({"nll": {k: torch.tensor(v) for k, v in nll.items()},
                    "gates": {"g0": gates["unregularized"], "g_plus": gates["necessary"],
                              "g_minus": gates["sufficient"]}}, args.out + ".pt")
    return out


# ------------------------------------------------------------------------------------- chg_lens
def g0_stage(model, data, masks: int, batch: int, updates: int, autocast, configs_per_pass) -> float:
    """fit_chg's unregularised stage alone (the reference's ``fit_stage("none")``): the same loop,
    loss, batches, precision and weight cast as inside ``fit_chg``, without the G+/G- stage that
    fit_chg always runs after it. Returns its seconds."""
    from chg_lens import models
    from chg_lens.chg import nll_loss
    from chg_lens.fitting import Stage, StageSpec, run_stages, uniform_gate_logits

    autocast = models.resolve_autocast(model, autocast)
    data_loss = nll_loss(model, data, autocast)
    shape = (masks, models.n_layers(model), models.n_heads(model))
    spec = StageSpec(Stage("g0", updates, 0.1, 0.01), lambda done: uniform_gate_logits(shape, 0))
    with models.frozen(model), models.cast_weights_once(model, autocast):
        done = run_stages([spec], data_loss, len(data), batch, 0, progress=False, configs_per_pass=configs_per_pass)
    return done["g0"].seconds


def run_ours(args, data) -> dict:
    import contextlib

    import chg_lens
    from chg_lens import models
    from chg_lens.data import TaskDataset

    if not args.cast_once:  # the plain autocast path: every weight re-cast on every op
        models.cast_weights_once = lambda model, mode: contextlib.nullcontext(0)
    model = chg_lens.load_model(args.model, device=args.device)
    ds = TaskDataset.from_tokens(data["tokens"], data["loss_mask"], int(data["pad_token_id"]),
                                 lengths=data.get("lengths"))
    ac = None if args.autocast == "none" else args.autocast  # "auto": chg_lens's default
    common = dict(n_seeds=args.masks, batch_size=args.batch, lam=args.lam, autocast=ac, progress=False,
                  configs_per_pass=args.configs_per_pass)
    out: dict = {}
    if args.mode == "stage":
        out["cases"] = []
        for case in cases(args):
            d = torch.load(case["data"])
            cds = TaskDataset.from_tokens(d["tokens"], d["loss_mask"], int(d["pad_token_id"]), lengths=d.get("lengths"))
            g0_stage(model, cds, case["masks"], case["batch"], args.warmup, ac, args.configs_per_pass)
            load = os.getloadavg()[0]
            with PeakRSS() as mem:
                sec = g0_stage(model, cds, case["masks"], case["batch"], args.updates, ac, args.configs_per_pass)
            out["cases"].append({**case, "seconds": sec, "updates_per_s": args.updates / sec,
                                 "fit_peak_rss_mib": mem.peak, "load_avg": [load, os.getloadavg()[0]],
                                 "precision": models.describe_precision(model, ac)})
            with open(args.out + ".partial", "w") as f:  # cases so far, for runs cut short
                json.dump(out, f)
    elif args.mode == "fit":
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            chg_lens.fit_chg(model, ds, updates=args.updates, reg_updates=args.reg_updates, **common)
            sec = time.perf_counter() - t0
        out.update(seconds=sec, fit_peak_rss_mib=mem.peak)
    else:  # equal: fit_chg draws batches with fitting.batch_rows; the parent gave the reference the same
        r = chg_lens.fit_chg(model, ds, updates=args.updates, reg_updates=args.reg_updates, seed=args.seed,
                             **common)
        torch.save({"nll": {k: r.traces[k]["nll"].mean(dim=1) for k in ("g0", "g_plus", "g_minus")},
                    "gates": {"g0": r.g0, "g_plus": r.g_plus, "g_minus": r.g_minus}}, args.out + ".pt")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ours", "ref"], required=True)
    p.add_argument("--mode", choices=["stage", "fit", "equal"], default="stage")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--masks", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--reg-updates", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", default="bf16",
                   help="bf16, none, or (chg_lens) auto, its default; for the reference, none disables its "
                        "built-in autocast (float32 work)")
    p.add_argument("--cast-once", action=argparse.BooleanOptionalAction, default=True,
                   help="chg_lens only: hold bf16 weights for the fit (its default); --no-cast-once: plain autocast")
    p.add_argument("--configs-per-pass", type=int, default=None, help="chg_lens only: masks per pass (memory)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", default="", help="stage mode: JSON list of {data, masks, batch} run in turn")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    out = run_ref(args, data) if args.side == "ref" else run_ours(args, data)
    if cuda:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    out.update(side=args.side, mode=args.mode, masks=args.masks, batch=args.batch, updates=args.updates,
               process_seconds=time.perf_counter() - t0, threads=torch.get_num_threads(),
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, torch=torch.__version__)
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
