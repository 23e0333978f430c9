"""Training: the loop (engine), how the student runs (forward), optimizer, schedule, EMA and early stopping (optim),
the detection loss, checkpoint io and keeper, the hyp table, evolution, AutoAnchor."""
