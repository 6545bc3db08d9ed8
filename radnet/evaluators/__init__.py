"""Evaluation: one predict-over-a-split path (``predict``) and the per-task metrics."""
