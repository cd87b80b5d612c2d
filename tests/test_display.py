"""A bare result in a notebook cell shows its summary, convergence banner and one compact table
(``_repr_html_``), with every text escaped."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest
import torch

from chg_lens import ablation, display, patching, plot, results, taxonomy
from chg_lens.contrastive import ContrastiveResult

from conftest import known_answer_data
from test_plot import H, L, make_result
from test_report import converged_result


def cells(page: str, table_class: str) -> list[list[str]]:
    """The text of every body cell of the first table with ``table_class``, row by row."""
    body = page.split(f"class='{table_class}'", 1)[1].split("</table>", 1)[0].split("<tbody>", 1)[1]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in body.split("</tr>") if "<td" in row]


def test_chg_result_shows_summary_red_banner_and_its_role_map():
    res = make_result(0, model="<b>m&m</b>")
    page = res._repr_html_()
    assert "NOT converged" in page and "chg-converged" not in page
    assert display.escape(res.convergence_warning()) in page  # the one-line advice, escaped
    assert display.escape(res.summary()) in page and "heads with score &gt;= 0.5" in page
    assert "<b>m&m</b>" not in page and "&lt;b&gt;m&amp;m&lt;/b&gt;" in page  # the model name is text
    grid = cells(page, "chg-grid")
    want = plot.head_table(res).sort_values(["layer", "head"])  # the report's roles: seed-mean scores
    letters = [display.ROLE_STYLE[r][0] for r in want["role"]]
    assert [c for row in grid for c in row] == letters and len(grid) == L and all(len(r) == H for r in grid)
    assert len(set(letters)) > 1  # the hand-made gates give more than one role


def test_converged_fit_shows_a_green_banner():
    page = converged_result()._repr_html_()
    assert "chg-converged" in page and ">converged</b>" in page and "NOT converged" not in page


def _contrastive(gates: torch.Tensor, validation: pd.DataFrame | None = None) -> ContrastiveResult:
    S = gates.shape[0]
    logits = torch.logit(gates)
    snaps = logits.sigmoid().expand(3, *gates.shape).clone()  # gates that stopped moving: settled
    traces = {k: torch.full((20, S), 1.0) for k in ("retain_nll", "forget_nll", "forget_term", "reg", "loss")}
    return ContrastiveResult(logits, traces, snaps, torch.tensor([0, 10, 19]),
                             {"updates": 20, "batch_size": 4, "lam": 0.1},
                             {"model": "m", "retain": "instr", "forget": "icl", "n_layers": 2, "n_heads": 3},
                             validation)


def test_contrastive_result_marks_the_heads_switched_off():
    g = torch.full((2, 2, 3), 0.9)
    g[:, 1, 2] = 0.1  # off in both seeds
    g[0, 0, 1], g[1, 0, 1] = 0.2, 0.7  # mean 0.45: off
    ev = pd.DataFrame({"variant": ["retain", "forget"], "gates": ["gated", "gated"], "accuracy": [0.9, 0.05],
                       "logprob": [-0.5, -4.0]})
    page = _contrastive(g, ev)._repr_html_()
    assert "chg-converged" in page  # settled gates and flat traces
    assert cells(page, "chg-grid") == [["·", "×", "·"], ["·", "·", "×"]]
    assert cells(page, "chg-table")[1] == ["forget", "gated", "0.05", "-4"]
    assert "heads off (mean gate &lt; 0.5): 2 of 6" in page


def test_patch_and_ablation_results_show_the_top_heads_by_effect(known_model):
    data = known_answer_data(8)
    sweep = ablation.head_sweep(known_model, data)
    page = sweep._repr_html_()
    assert "chg-converged" not in page and "NOT converged" not in page  # not a fit: no banner
    top = cells(page, "chg-table")
    order = sweep.frame["delta_logprob"].abs().sort_values(ascending=False, kind="stable").index
    assert [r[:2] for r in top] == [[str(sweep.frame.loc[i, "layer"]), str(sweep.frame.loc[i, "head"])] for i in order]
    assert top[0][:2] == ["0", "0"]  # the answer-copying head costs the most
    assert f"ablation on {sweep.meta['model']} / known_answer: 4 rows" in page and "baseline: " in page

    frame = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "effect": [0.1, -2.0, 1.0], "se": [0.1] * 3,
                          "t": [1.0] * 3, "p": [0.5] * 3, "mediating": [False, True, False]})
    res = patching.PatchResult(frame, torch.zeros(3, 4), {"clean": 2.0, "corrupted": -1.0},
                               {"model": "m", "task": "ioi", "metric": "logit_diff", "n_layers": 2, "n_heads": 2})
    page = res._repr_html_()
    assert [r[:3] for r in cells(page, "chg-table")] == [["0", "1", "-2"], ["1", "0", "1"], ["0", "0", "0.1"]]
    assert "mediating heads: 1 (L0H1)" in page and "baseline: clean 2, corrupted -1" in page


@dataclass
class _NewKind(results.FrameResult):
    """A result kind added later (attribution, faithfulness, ...): the default view, no code of its own."""

    kind = "new_kind_for_test"
    frame: pd.DataFrame
    baseline: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)


def test_every_frame_result_has_a_default_view_with_escaped_cells():
    frame = pd.DataFrame({"layer": range(12), "head": [0] * 12, "note": ["<script>x</script>"] + ["ok"] * 11})
    page = _NewKind(frame, {}, {"task": "t"})._repr_html_()
    rows = cells(page, "chg-table")
    assert len(rows) == 10 and rows[0] == ["0", "0", "&lt;script&gt;x&lt;/script&gt;"] and "<script>" not in page
    assert "2 more row(s)" in page and "new_kind_for_test on t: 12 rows" in page


@pytest.mark.parametrize("value, text", [(0.123456, "0.1235"), (float("nan"), "nan"), (3, "3"), (True, "True"),
                                         ("a<b", "a<b")])
def test_number(value, text):
    assert display.number(value) == text


def test_summary_block_wraps():
    page = display.result_html("t", summary="x" * 500)
    assert "white-space:pre-wrap;overflow-wrap:anywhere" in page.split("<pre", 1)[1].split(">", 1)[0]
    assert taxonomy.SCORES  # the role letters cover every role
    assert set(display.ROLE_STYLE) == set(taxonomy.ROLES.values())
