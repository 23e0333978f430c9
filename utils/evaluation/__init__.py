"""Evaluation: metrics (AP, P/R, confusion matrix) and non-max suppression."""
