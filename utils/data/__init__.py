"""Data: dataset yaml, label verification and cache, augmentation, loaders, the unlabelled stream."""
