"""jnnex benchmarks: hand-derived gradients against autodiff, side by side in one process. Run ``jnnex bench``."""
