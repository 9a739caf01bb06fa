"""Exact sparse-direct solvers for the PDE pairs, on the grid of :mod:`operators.pde`.

Grid: ``N x N`` nodes on ``[0, 1]^2`` including the boundary, ``h = 1 / (N - 1)``, ``u = 0`` on
boundary nodes. Each solver assembles the 5-point stencil of its PDE (float64) and solves it with
``scipy.sparse.linalg.spsolve``:

- Darcy (``-div(a grad u) = f``, finite volumes, arithmetic face averages):
  ``sum_Q (a_P + a_Q)/2 (u_P - u_Q) = f h^2``.
- Poisson (``laplace(u) = a``): ``(sum_Q u_Q - 4 u_P) / h^2 = a_P``.
- Helmholtz (``laplace(u) + k^2 u = a``): ``(sum_Q u_Q - 4 u_P) / h^2 + k^2 u_P = a_P``.

This module imports numpy and scipy only (no torch, nothing of the service), so training data can
be generated on a bare machine; :mod:`operators.pde` holds the residual operators that check these
solutions.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

#: Neighbour offsets (di, dj) of the 5-point stencil.
NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def grid_spacing(n: int) -> float:
    """``h = 1 / (N - 1)`` for ``N`` nodes including the boundary."""
    return 1.0 / (n - 1)


def interior(t, di: int = 0, dj: int = 0):
    """Interior block of the last two dims shifted by ``(di, dj)`` (numpy or torch)."""
    n, m = t.shape[-2], t.shape[-1]
    return t[..., 1 + di: n - 1 + di, 1 + dj: m - 1 + dj]


def _solve_five_point(diag: np.ndarray, weights: dict, rhs: np.ndarray) -> np.ndarray:
    """Solve ``diag_P u_P + sum_Q w_PQ u_Q = rhs_P`` on interior nodes with ``u = 0`` on the boundary.

    ``diag``, ``rhs``: ``[N-2, N-2]``; ``weights[(di, dj)]``: ``[N-2, N-2]`` coefficient of the
    neighbour at offset ``(di, dj)``. Returns ``u: [N, N]`` (boundary zeros).
    """
    n = diag.shape[0] + 2
    index = -np.ones((n, n), dtype=np.int64)
    index[1:-1, 1:-1] = np.arange((n - 2) ** 2).reshape(n - 2, n - 2)
    rows, cols, vals = [index[1:-1, 1:-1].ravel()], [index[1:-1, 1:-1].ravel()], [diag.ravel()]
    for (di, dj), w in weights.items():
        q = interior(index, di, dj).ravel()
        inside = q >= 0  # boundary neighbours carry u = 0: drop them
        rows.append(index[1:-1, 1:-1].ravel()[inside])
        cols.append(q[inside])
        vals.append(w.ravel()[inside])
    size = (n - 2) ** 2
    mat = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(size, size))
    u = np.zeros((n, n))
    u[1:-1, 1:-1] = spla.spsolve(mat, rhs.ravel()).reshape(n - 2, n - 2)
    return u


def solve_darcy(a: np.ndarray, f: float = 1.0) -> np.ndarray:
    """Ground truth for Darcy: ``sum_Q (a_P + a_Q)/2 (u_P - u_Q) = f h^2``, ``u = 0`` on the boundary."""
    a = np.asarray(a, dtype=np.float64)
    n = a.shape[0]
    a_p = interior(a)
    faces = {(di, dj): (a_p + interior(a, di, dj)) / 2 for di, dj in NEIGHBOURS}
    diag = sum(faces.values())
    weights = {s: -c for s, c in faces.items()}
    return _solve_five_point(diag, weights, np.full_like(a_p, f * grid_spacing(n) ** 2))


def _solve_helmholtz_like(a: np.ndarray, k2: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    h2 = grid_spacing(a.shape[0]) ** 2
    a_p = interior(a)
    diag = np.full_like(a_p, -4 / h2 + k2)
    weights = {s: np.full_like(a_p, 1 / h2) for s in NEIGHBOURS}
    return _solve_five_point(diag, weights, a_p.copy())


def solve_poisson(a: np.ndarray) -> np.ndarray:
    """Ground truth for Poisson: ``(sum_Q u_Q - 4 u_P)/h^2 = a_P``, ``u = 0`` on the boundary."""
    return _solve_helmholtz_like(a, 0.0)


def solve_helmholtz(a: np.ndarray, k: float = 1.0) -> np.ndarray:
    """Ground truth for Helmholtz: ``(sum_Q u_Q - 4 u_P)/h^2 + k^2 u_P = a_P``, ``u = 0`` on the boundary."""
    return _solve_helmholtz_like(a, float(k) ** 2)
