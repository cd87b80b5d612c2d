"""Slow: the task library on the real SmolLM2-135M-Instruct. IOI and antonym (10-shot) must be well
above chance, and so must the ABA/ABB choice between the query's two words (chance 0.5)."""

from __future__ import annotations

import math

import pytest
import torch

from chg_lens import tasks
from chg_lens.scoring import evaluate

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow


def _accuracy(model, data) -> float:
    return float(evaluate(model, data, batch_size=32).correct.float().mean())


def test_smollm2_ioi_and_antonym_well_above_chance(smollm2):
    _, ioi_val = tasks.ioi(smollm2, n_prompts=160, seed=1)  # 32 validation prompts
    ioi_acc = _accuracy(smollm2, ioi_val)
    _, fv_val = tasks.function_vector(smollm2, "antonym", "icl", n_prompts=160, seed=0,
                                      data_dir=SHARED_DATA / "function_vectors")
    fv_acc = _accuracy(smollm2, fv_val)  # exact match of every answer token (greedy)
    print(f"SmolLM2 accuracy: IOI {ioi_acc:.3f} ({len(ioi_val)} prompts), antonym 10-shot {fv_acc:.3f} ({len(fv_val)})")
    # Measured on this machine (seed 0, 32 validation prompts each): IOI 0.781; antonym 10-shot 0.156
    # (the instruction format: 0.25). Chance is 0.5 for IOI's two names and ~0 for an open-vocabulary
    # greedy answer; a 135M model is weak on Todd et al.'s antonyms (the paper used 1-8B Llamas).
    assert ioi_acc >= 0.7
    assert fv_acc >= 0.09


def test_smollm2_aba_abb_above_chance(smollm2):
    _, val = tasks.aba_abb(smollm2, n_prompts=320, seed=0)  # 64 validation prompts
    wrong = val.subset(range(len(val)))
    last = val.lengths - 1
    rows = torch.arange(len(val))
    wrong.tokens[rows, last] = torch.tensor([a[1] for a in val.row_meta["answers"]])
    lp_right = evaluate(smollm2, val, batch_size=32).logprob_sum[0]
    lp_wrong = evaluate(smollm2, wrong, batch_size=32).logprob_sum[0]
    choice = float((lp_right > lp_wrong).float().mean())
    by_rule = {r: float((lp_right > lp_wrong)[[x == r for x in val.row_meta["rule"]]].float().mean()) for r in ("ABA", "ABB")}
    print(f"SmolLM2 ABA/ABB: right-over-other-query-word choice {choice:.3f} of {len(val)} (by rule {by_rule})")
    # Measured on this machine (seed 0, 64 validation prompts): 0.812 (ABA 0.77, ABB 0.85). The issue
    # expected about 0.6 ("near chance"); with this task's alphabetic single-token words SmolLM2 does
    # better than that. Chance is 0.5 (one of the query's two words); the margin is 3 binomial standard
    # errors of chance at this many prompts (0.1875 for 64), so a model guessing fails it.
    chance = 0.5
    margin = 3 * math.sqrt(chance * (1 - chance) / len(val))
    assert choice > chance + margin, (choice, chance + margin)
