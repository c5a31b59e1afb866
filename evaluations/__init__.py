"""ADM-compatible evaluation: FID, sFID, Inception Score, precision and recall.

`evaluations.metrics` works on feature arrays (no network needed); `evaluations.inception` is the
TF-faithful Inception of torch-fidelity with every feature ADM reads; `evaluations.evaluate` is the CLI.
"""

from evaluations.metrics import feature_statistics, frechet_distance, inception_score, precision_recall

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "precision_recall"]
