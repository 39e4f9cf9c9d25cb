"""Evaluation: constrained forecasting, metrics, baselines, behaviour classes and reports."""
