"""The lowest layer: errors, yaml io and atomic writes, logging and run folders, boxes, distributed helpers, CPU
features, and the process set-up (seeds, allocator)."""
