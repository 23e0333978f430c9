"""Subject packages, lowest layer first: core, data, evaluation, reporting, training (see README: Layout)."""
