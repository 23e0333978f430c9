"""Training: the loop (engine), the detection loss, checkpoint io and keeper, the hyp table, evolution, AutoAnchor."""
