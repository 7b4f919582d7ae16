"""Running models and measuring them: the main output of a model call, output fidelity, metric functions.

Task evaluation on the zoo's data sets (`evaluate`) is lab code: `postquant_lab.evaluate`.
"""

from postquant.eval.fidelity import fidelity
from postquant.eval.metrics import average_ranks, pearson, spearman, sqnr_db, topk_accuracy, topk_correct
from postquant.eval.run import eval_mode, main_output, run_model

__all__ = [
    "average_ranks",
    "eval_mode",
    "fidelity",
    "main_output",
    "pearson",
    "run_model",
    "spearman",
    "sqnr_db",
    "topk_accuracy",
    "topk_correct",
]
