"""chg_lens: Causal Head Gating and friends on TransformerLens.

Example::

    import chg_lens
    model = chg_lens.load_model("smollm2-135m-instruct")
    train, val = chg_lens.tasks.ioi(model, n_prompts=128)
    result = chg_lens.fit_chg(model, train, n_seeds=4, updates=100, reg_updates=100, validation=val)
    result.scores().head()
    result.save("runs/ioi"); chg_lens.load("runs/ioi")   # the saved kind's class (CHGResult here)
"""

from . import gates, models, pairs, results, tasks, taxonomy
from .attribution import AttributionResult, attribute_heads
from .chg import CHGConfig, CHGResult, fit_chg, validate
from .contrastive import ContrastiveResult, evaluate_contrastive, fit_contrastive
from .data import TaskDataset, TaskSplits
from .scoring import RowScores, evaluate, row_logprobs
from .models import load_model
from .results import load
from . import faithfulness  # the module, callable as the function: chg_lens.faithfulness(model, data, rankings)
from .faithfulness import FaithfulnessResult

__version__ = "0.1.0"

__all__ = [
    "CHGConfig", "CHGResult", "RowScores", "TaskDataset", "TaskSplits", "evaluate", "fit_chg",
    "gates", "load", "load_model", "results", "models", "row_logprobs", "tasks", "taxonomy", "validate",
    "ContrastiveResult", "evaluate_contrastive", "fit_contrastive",
    "AttributionResult", "attribute_heads", "FaithfulnessResult", "faithfulness", "pairs",
]
