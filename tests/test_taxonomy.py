"""Scores, roles and aggregation on hand-set gates with known answers."""

import pandas as pd
import torch

from chg_lens import taxonomy


def test_scores_and_roles_by_hand():
    g_plus = torch.tensor([[[1.0, 0.0, 1.0, 0.5]]])
    g_minus = torch.tensor([[[1.0, 0.0, 0.0, 0.5]]])
    f = taxonomy.scores_frame(g_plus, g_minus)
    assert f["facilitation"].tolist() == [1.0, 0.0, 0.0, 0.5]
    assert f["interference"].tolist() == [0.0, 1.0, 0.0, 0.5]
    assert f["irrelevance"].tolist() == [0.0, 0.0, 1.0, 0.25]
    # ties go to facilitating first
    assert f["role"].tolist() == ["facilitating", "interfering", "irrelevant", "facilitating"]


def test_always_is_min_and_any_is_max_over_seeds():
    frame = pd.DataFrame({
        "seed": [0, 1, 0, 1], "layer": [0, 0, 0, 0], "head": [0, 0, 1, 1],
        "facilitation": [0.9, 0.2, 0.1, 0.1], "interference": [0.0, 0.6, 0.7, 0.8], "irrelevance": [0.1, 0.2, 0.3, 0.4],
    })
    agg = taxonomy.aggregate(frame)
    assert agg["always_facilitation"].tolist() == [0.2, 0.1]
    assert agg["any_facilitation"].tolist() == [0.9, 0.1]
    assert agg["always_interference"].tolist() == [0.0, 0.7]
    pct = taxonomy.percent_above(frame).iloc[0]
    assert pct["any_facilitation"] == 50.0 and pct["always_facilitation"] == 0.0
    assert pct["always_interference"] == 50.0 and pct["any_interference"] == 100.0


def test_frame_roles_is_the_one_rule_with_its_tie_order():
    frame = pd.DataFrame({"mean_facilitation": [0.5, 0.1, 0.2, 0.0, 0.9],
                          "mean_interference": [0.5, 0.4, 0.4, 0.0, 0.1],
                          "mean_irrelevance": [0.1, 0.4, 0.7, 0.0, 0.0]})
    assert taxonomy.frame_roles(frame, prefix="mean_") == [
        "facilitating", "interfering", "irrelevant", "facilitating", "facilitating"]
    g = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(0))
    scores = taxonomy.scores_frame(g, g.flip(0))
    assert taxonomy.frame_roles(scores) == scores.role.tolist()
    assert taxonomy.frame_roles(frame.iloc[:0], prefix="mean_") == []
