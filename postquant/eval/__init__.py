"""Evaluation: task metrics on a zoo model's data, output fidelity, and the metric functions."""

from postquant.eval.evaluate import EvalResult, eval_mode, evaluate, mean_pool, sentence_embeddings
from postquant.eval.fidelity import fidelity
from postquant.eval.metrics import average_ranks, pearson, spearman, sqnr_db, topk_accuracy, topk_correct
from postquant.eval.run import main_output, run_model

__all__ = [
    "EvalResult",
    "average_ranks",
    "eval_mode",
    "evaluate",
    "fidelity",
    "main_output",
    "mean_pool",
    "pearson",
    "run_model",
    "sentence_embeddings",
    "spearman",
    "sqnr_db",
    "topk_accuracy",
    "topk_correct",
]
