"""``chg-lens report RESULTS_DIR``: an HTML report, head_rankings.csv and a summary from a results folder."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", help="a CHG results folder (or a folder of them; ablation/patching/"
                   "contrastive CSV or parquet files inside are plotted too)")
    p.add_argument("--out", default=None, help="where to write (default: RESULTS_DIR)")


def run(a: argparse.Namespace) -> int:
    from ..report import write_report

    paths = write_report(a.results_dir, a.out)
    print(paths["summary"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
