"""Reporting: plots, results.csv and TensorBoard."""
