"""Print the architecture parity table (docs/models.md) for this TransformerLens line.

    PYTHONPATH=$PWD python benchmarks/parity_table.py        # run once per venv (tl4, tl3)

Max abs log-prob error of chg_lens against each tiny random model's own forward (fp32): ungated,
gate 0 on two heads (vs. a Hugging Face forward pre-hook on the attention output projection, or on
3.x configs a copy with those heads' W_O zeroed), gate 0.5, and gates of 1 vs. ungated. A family
the line cannot run prints its error. Same models and references as tests/test_parity.py.
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

import parity_models as pm  # noqa: E402
from chg_lens import models  # noqa: E402

line = f"{models.TL_MAJOR}.x"
runs = [(f, pm.hf_parity) for f in pm.FAMILIES if pm.available(f)]
if models.TL_MAJOR < 4:
    runs += [(n, pm.tl3_parity) for n in pm.tl3_configs()]
print("| family | TL | ungated | gate 0 | gate 0.5 | gate 1 |")
print("|---|---|---|---|---|---|")
for name, fn in runs:
    try:
        e = fn(name)
        print(f"| {name} | {line} | {e['ungated']:.1e} | {e['gate0']:.1e} | {e['gate_half']:.1e} | {e['gate1']:.1e} |",
              flush=True)
    except Exception as err:  # noqa: BLE001 - a table of what fails
        msg = str(err).splitlines()[0][:90].replace("|", "/")
        print(f"| {name} | {line} | fails: `{type(err).__name__}: {msg}` | | | |", flush=True)
