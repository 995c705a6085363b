"""The baseline: one K-way softmax head on the same cached features, trained exactly like the OvR heads
(same trainer, optimizer, epochs, early stopping, L2 grid and seeds), so a comparison measures the loss only."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .heads import (Normalizer, autograd_grad, ce_columns, ce_linear_grad, check_head, encode_labels, init_linear,
                    init_mlp, stacked_logits, train_columns)
from .runtime import head_seed, resolve_device


class SoftmaxClassifier:
    def __init__(self, head: str = "linear", hidden: int = 256, epochs: int = 100, lr: float = 3e-3,
                 batch_size: int = 128, patience: int = 10, l2_grid=(1e-3, 1e-2, 1e-1, 1.0),
                 normalize: str = "standardize", seed: int = 0, device: str = "auto") -> None:
        self.head, self.hidden, self.epochs, self.lr = head, hidden, epochs, lr
        self.batch_size, self.patience, self.l2_grid = batch_size, patience, l2_grid
        self.normalize, self.seed, self.device = normalize, seed, device

    def _labels(self, y) -> torch.Tensor:
        return encode_labels(self.classes_, y)

    def fit(self, X, y, X_val=None, y_val=None, progress: Callable | None = None) -> "SoftmaxClassifier":
        """Each L2 strength is one column (a whole softmax model); the one with the lowest val loss is kept."""
        check_head(self.head)
        dev = resolve_device(self.device)
        X = torch.as_tensor(X, dtype=torch.float32).to(dev)
        self.classes_ = np.unique(np.asarray(y))
        K, D, G = len(self.classes_), X.shape[1], len(self.l2_grid)
        self.normalizer_ = Normalizer.fit(self.normalize, X)
        has_val = X_val is not None and len(X_val) > 0
        Xv = self.normalizer_(torch.as_tensor(X_val, dtype=torch.float32).to(dev)) if has_val else None
        yv = self._labels(y_val).to(dev) if has_val else None
        seeds = [head_seed(self.seed, "softmax")] * G
        params = init_linear(seeds, D, K) if self.head == "linear" else init_mlp(seeds, D, self.hidden, K)
        grid = torch.tensor(self.l2_grid if has_val else [self.l2_grid[G // 2]] * G, dtype=torch.float32)
        t0 = time.perf_counter()
        grad = ce_linear_grad if self.head == "linear" else autograd_grad(ce_columns)
        res = train_columns(params, grad, ce_columns, self.normalizer_(X), self._labels(y).to(dev), Xv, yv, grid,
                            None, self.epochs, self.lr, self.batch_size, self.patience, self.seed, progress)
        g = int(res.best_val.argmin()) if has_val else 0
        self.params_ = {k: v[g:g + 1].cpu().clone() for k, v in res.params.items()}
        self.l2_ = float(grid[g])
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def decision_function(self, X) -> np.ndarray:
        X = torch.as_tensor(X, dtype=torch.float32)
        with torch.no_grad():
            p = {k: v.to(X.device) for k, v in self.params_.items()}
            return stacked_logits(p, self.normalizer_(X))[:, 0].cpu().numpy()

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]
