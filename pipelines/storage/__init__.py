"""Where manifests and results live: reading manifests, the results directory, its lease."""
