"""``chg-lens report RESULTS_DIR``: an HTML report, head_rankings.csv and a summary from a results folder."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", help="a CHG results folder (or a folder of them), or a `chg-lens compare` folder; "
                   "ablation/patching/contrastive CSV or parquet files inside are plotted too")
    p.add_argument("--out", default=None, help="where to write (default: RESULTS_DIR)")
    p.add_argument("--allow-skipped", action="store_true",
                   help="exit 0 even when some results or tables could not be read (they are listed either way)")


def run(a: argparse.Namespace) -> int:
    import sys

    from .. import checks
    from ..report import write_report

    if a.out is not None:
        checks.output_dir(a.out)
    paths = write_report(a.results_dir, a.out)
    print(paths["summary"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    for where, why in paths.skipped:
        print(f"chg-lens report: skipped {where}: {why}", file=sys.stderr)
    if paths.skipped and not a.allow_skipped:
        print(f"chg-lens report: {len(paths.skipped)} item(s) skipped; fix or remove them, or pass --allow-skipped",
              file=sys.stderr)
        return 1
    return 0
