"""Utilities split by subject: boxes, nms, loss, datasets, augment, metrics, checkpoint, plots, loggers, distributed."""
