"""Evaluation of a trained model on held-out TRs: model, ridge baseline, noise ceiling and oracle.

Every number of one voxel set comes from the same TRs and voxels. ``evaluate(checkpoint, store,
split)`` -> :class:`EvaluationResult`; ``write_evaluation(result, out_dir)`` writes it.
"""

from giblet_ds.evaluation.evaluate import EvaluationResult, evaluate, predict_split
from giblet_ds.evaluation.output import format_table, write_evaluation
from giblet_ds.evaluation.ridge import RidgeBaseline, fit_ridge_baseline
from giblet_ds.evaluation.scores import SetScores, normalized_term, summarize_set

__all__ = [
    "EvaluationResult",
    "RidgeBaseline",
    "SetScores",
    "evaluate",
    "fit_ridge_baseline",
    "format_table",
    "normalized_term",
    "predict_split",
    "summarize_set",
    "write_evaluation",
]
