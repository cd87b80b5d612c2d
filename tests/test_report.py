"""`chg-lens report`: files, rankings, and the HTML page rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from chg_lens import cli
from chg_lens.report import find_results, head_rankings, write_report
from test_plot import make_result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def converged_result(seed: int = 0, model: str = "c"):
    """A hand-made result whose gates stopped moving and whose NLL is flat: it converged."""
    res = make_result(seed, model=model)
    for k in res.snapshots:
        res.snapshots[k] = torch.sigmoid(res.logits[k]).expand_as(res.snapshots[k]).clone()
    res.traces = {k: {"nll": torch.full((10, res.n_seeds), 0.5)} for k in res.traces}
    return res


@pytest.fixture(scope="module")
def converged_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("converged")
    converged_result().save(root / "c")
    return root


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_result(0, model="a").save(root / "a")
    make_result(1, model="b").save(root / "b")
    (root / "b" / "checkpoint").mkdir()
    pd.DataFrame({"layer": [0, 1], "head": [0, 1], "facilitation": [0.9, 0.1], "effect": [2.0, 0.0],
                  "mediating": [True, False]}).to_csv(root / "cma.csv", index=False)
    pd.DataFrame({"x": [1]}).to_csv(root / "unrelated.csv", index=False)
    return root


def test_report_cli_writes_files(results_dir, capsys):
    assert cli.main(["report", str(results_dir)]) == 0
    out = capsys.readouterr().out
    assert "cross-model consistency" in out and "cma: cma.csv" in out and "unrelated" not in out
    page = (results_dir / "report.html").read_text()
    assert page.count("Plotly.newPlot") == int(re.search(r"data-figures='(\d+)'", page).group(1))
    assert page.count("plotly.js v") == 1  # plotly.js embedded once ...
    assert not re.search(r"<script[^>]*\bsrc=", page) and "<link" not in page  # ... and nothing fetched
    ranks = pd.read_csv(results_dir / "head_rankings.csv")
    res = make_result(0, model="a")
    top = ranks[ranks.model == "a"].iloc[0]
    want = res.g_minus.mean(0)
    assert float(top.mean_facilitation) == pytest.approx(float(want.max()))
    assert (int(top.layer), int(top["head"])) == divmod(int(want.argmax()), want.shape[1])
    assert top.rank_facilitation == 1 and "mean_g0" in ranks.columns


def test_banner_only_when_not_converged(results_dir, converged_dir, tmp_path):
    assert converged_result().converged and not make_result(0).converged
    good = (write_report(converged_dir, tmp_path / "good")["html"]).read_text()
    assert "not-converged" not in good and "Not converged" not in good
    assert "Convergence diagnostics (converged)" in good and "Seed agreement" in good
    bad = (write_report(results_dir, tmp_path / "bad")["html"]).read_text()
    body = bad.split("<body>", 1)[1]
    assert body.index("id='not-converged'") < body.index("<h2>Summary</h2>")  # at the top
    assert "2 of 2 fit(s)" in body and "CHG fit did not converge" in body
    assert "Convergence diagnostics (NOT converged)" in body
    mixed = tmp_path / "mixed"
    converged_result().save(mixed / "c")
    make_result(1, model="b").save(mixed / "b")
    page = write_report(mixed)["html"].read_text()
    assert "1 of 2 fit(s)" in page and "<b>b</b>" in page and "<b>c</b>" not in page
    assert "converged: yes" in (mixed / "report_summary.txt").read_text()


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="no CHG result"):
        find_results(tmp_path)
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def test_head_rankings_ranks_within_model():
    frame = pd.concat([make_result(0, model="a").scores(), make_result(1, model="b").scores()])
    r = head_rankings(frame)
    assert sorted(r[r.model == "b"].rank_interference) == list(range(1, 13))


def _render(path, tmp_path):
    with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000",
             "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    return proc.stdout, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make setup-chromium)")
def test_report_renders_in_headless_chromium(results_dir, converged_dir, tmp_path):
    write_report(converged_dir)
    dom, _ = _render(converged_dir / "report.html", tmp_path)
    assert 'id="script-errors" data-count="0"' in dom and "Convergence diagnostics (converged)" in dom
    assert 'id="not-converged"' not in dom  # no banner on a converged fit
    write_report(results_dir)
    dom, log = _render(results_dir / "report.html", tmp_path)
    banner = re.search(r'<div id="not-converged" class="banner">(.*?)</div>', dom, re.S)
    assert banner and "did not converge" in banner.group(1)
    assert dom.index('id="not-converged"') < dom.index("<h2>Summary</h2>")
    n_fig = int(re.search(r"data-figures=\"(\d+)\"", dom).group(1))
    assert n_fig >= 15
    assert dom.count('class="plotly-graph-div js-plotly-plot"') == n_fig  # every figure div was drawn by plotly.js
    assert dom.count('class="main-svg"') >= n_fig
    assert 'id="script-errors" data-count="0"' in dom
    assert not re.search(r"CONSOLE.*(Error|Uncaught)", log), log[-2000:]
    # the error hook does catch a failing script, so the check above can fail
    broken = tmp_path / "broken.html"
    broken.write_text((results_dir / "report.html").read_text().replace("</body>", "<script>undefinedFn()</script></body>"))
    dom, _ = _render(broken, tmp_path)
    assert 'data-count="1"' in dom and "undefinedFn" in dom


def test_saved_ablation_result_is_found_by_kind_once(tmp_path):
    from chg_lens.ablation import AblationResult

    make_result(0, model="a").save(tmp_path / "a")
    frame = pd.DataFrame({"score": "facilitation", "seed": 0, "step": [0, 1], "layer": [0, 1], "head": [1, 0],
                          "logprob_retained": [-1.0, -1.2], "logprob_ablated": [-1.0, -2.0],
                          "delta_logprob": [0.0, -0.8]})
    AblationResult(frame, {"logprob": -1.0}, {"n_layers": 2, "n_heads": 2}).save(tmp_path / "fig2")  # frame.csv + .parquet
    frame.to_csv(tmp_path / "loose.csv", index=False)
    frame.to_parquet(tmp_path / "loose.parquet", index=False)
    found = find_results(tmp_path)
    assert [name for name, _ in found.extras["ablation"]] == ["fig2", "loose.parquet"]
    pd.testing.assert_frame_equal(found.extras["ablation"][0][1], frame, check_dtype=False)


def test_a_result_saved_in_the_folder_itself_is_named_by_the_folder(tmp_path):
    """`chg-lens report runs/chg-smollm2-ioi` on a folder `chg-lens fit` wrote: the summary names the
    result "chg-smollm2-ioi", not "." ("[.]", "(.)"), and the summary block wraps inside the page."""
    folder = tmp_path / "chg-smollm2-ioi"
    res = converged_result()
    res.meta["task"] = "ioi " + "x" * 300  # one very long summary line
    res.save(folder)
    paths = write_report(folder)
    summary = paths["summary"].read_text()
    assert summary.startswith("[chg-smollm2-ioi]\n") and "[.]" not in summary
    page = paths["html"].read_text()
    assert "<small>(chg-smollm2-ioi)</small>" in page and "<small>(.)</small>" not in page
    shown = page.split("<pre class='summary'>", 1)[1].split("</pre>", 1)[0]
    assert shown.startswith("[chg-smollm2-ioi]\n") and "[.]" not in shown
    assert "pre{white-space:pre-wrap;overflow-wrap:anywhere}" in page
    nested = tmp_path / "runs"
    res.save(nested / "a" / "b")
    assert write_report(nested)["summary"].read_text().startswith(f"[{Path('a') / 'b'}]\n")
