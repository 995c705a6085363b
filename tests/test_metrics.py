"""ovr/learn/metrics.py against scikit-learn's own functions on the same arrays."""
import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from ovr.learn.metrics import binary_head_metrics


def test_head_metrics_are_scikit_learns_including_heads_that_never_fire_or_have_no_positive():
    rng = np.random.default_rng(0)
    conf = rng.uniform(size=(200, 6))
    targets = rng.uniform(size=(200, 6)) < 0.2
    targets[:, 4] = False  # no positive row
    thresholds = np.array([0.5, 0.9, 0.1, 1.1, 0.5, 0.3])  # head 3 never fires
    ours = binary_head_metrics(conf, targets, thresholds)
    for j in range(6):
        p, r, f, _ = precision_recall_fscore_support(targets[:, j].astype(int), (conf[:, j] >= thresholds[j]).astype(int),
                                                     average="binary", zero_division=0)
        assert ours[j]["positives"] == int(targets[:, j].sum())
        ours[j].pop("positives")
        assert ours[j] == {"precision": float(p), "recall": float(r), "f1": float(f)} or np.allclose(
            [ours[j]["precision"], ours[j]["recall"], ours[j]["f1"]], [p, r, f], atol=1e-12), j
