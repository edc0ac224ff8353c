"""Evaluation on held-out data in the training format: metrics, one model's results, the side-by-side report."""
