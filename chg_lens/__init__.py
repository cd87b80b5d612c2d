"""chg_lens: Causal Head Gating and friends on TransformerLens.

Example::

    import chg_lens
    model = chg_lens.load_model("smollm2-135m-instruct")
    train, val = chg_lens.tasks.ioi(model, n_prompts=128)
    result = chg_lens.fit_chg(model, train, n_seeds=4, updates=100, reg_updates=100, validation=val)
    result.scores().head()
"""

from . import gates, models, tasks, taxonomy
from .chg import CHGConfig, CHGResult, fit_chg, validate
from .contrastive import ContrastiveResult, evaluate_contrastive, fit_contrastive
from .data import TaskDataset, TaskSplits
from .logprobs import RowScores, evaluate, row_logprobs
from .models import load_model

__version__ = "0.1.0"

__all__ = [
    "CHGConfig", "CHGResult", "RowScores", "TaskDataset", "TaskSplits", "evaluate", "fit_chg",
    "gates", "load_model", "models", "row_logprobs", "tasks", "taxonomy", "validate",
    "ContrastiveResult", "evaluate_contrastive", "fit_contrastive",
]
