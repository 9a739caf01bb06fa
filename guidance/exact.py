"""Exact posteriors of linear-Gaussian problems, for checking samplers against truth.

Prior ``x ~ N(0, Sigma)``, observation ``y = A x + sigma_y e``. Posterior mean
``Sigma A^T (A Sigma A^T + sigma_y^2 I)^{-1} y`` and covariance
``Sigma - Sigma A^T (A Sigma A^T + sigma_y^2 I)^{-1} A Sigma`` by dense linear algebra.
"""
from __future__ import annotations

import numpy as np
import torch


def dense_matrix(operator) -> np.ndarray:
    """The matrix of a linear operator, column by column (float64; small problems only)."""
    n = int(np.prod(operator.in_shape))
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(operator.in_shape))
    cols = [operator.forward(eye[i:i + 256]).reshape(min(256, n - i), -1) for i in range(0, n, 256)]
    return torch.cat(cols).T.numpy()


def gaussian_posterior(cov: np.ndarray, a: np.ndarray, y: np.ndarray, noise_sigma: float):
    """``(mean, covariance)`` of ``x | y`` for ``x ~ N(0, cov)``, ``y = a x + noise_sigma e``."""
    s = a @ cov @ a.T + noise_sigma ** 2 * np.eye(a.shape[0])
    k = np.linalg.solve(s, a @ cov).T  # cov A^T S^{-1}
    return k @ y, cov - k @ a @ cov
