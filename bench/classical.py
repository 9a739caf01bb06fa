"""What a lab would use without a learned prior: the classical baselines of the benchmarks.

* ``biharmonic_inpaint``: biharmonic inpainting (``skimage.restoration.inpaint_biharmonic``).
* ``wiener_deconvolve``: Fourier Wiener/Tikhonov ``X = conj(H) Y / (|H|^2 + lam)``. With the
  ground truth given, ``lam`` is picked per image from a log grid (1e-5 .. 1) by the best PSNR
  against it: an *oracle* choice, so the baseline is at its strongest (a real lab would have
  to guess ``lam``; the learned priors get no such help).
* ``bicubic_upsample``: bicubic interpolation of the block means to full size, clipped to [0, 1].
* ``interpolate_points``: scattered-data interpolation of sparse node values (Darcy baselines).
* ``psnr``.

All functions take and return numpy arrays of one image ``[H, W]`` (or ``[C, H, W]`` where noted).
"""
from __future__ import annotations

import numpy as np

LAM_GRID = np.logspace(-5, 0, 26)  # 5 per decade


def psnr(x, ref, data_range: float = 1.0) -> float:
    """``10 log10(data_range^2 / MSE)``; ``inf`` for a perfect match, ``nan`` if ``x`` is not finite."""
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if not np.isfinite(x).all():
        return float("nan")
    mse = float(np.mean((x - ref) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def biharmonic_inpaint(y, mask) -> np.ndarray:
    """Fill the unobserved pixels (``mask == 0``) of ``y`` by biharmonic inpainting.

    ``y``, ``mask``: ``[H, W]`` (or ``[1, H, W]``); ``mask`` 1 = observed. Returns ``[H, W]``
    clipped to [0, 1].
    """
    from skimage.restoration import inpaint_biharmonic

    y, mask = np.squeeze(np.asarray(y, dtype=np.float64)), np.squeeze(np.asarray(mask))
    out = inpaint_biharmonic(np.where(mask > 0, y, 0.0), mask == 0)
    return np.clip(out, 0.0, 1.0)


def _transfer(kernel, shape) -> np.ndarray:
    """FFT of the centred kernel embedded in an ``H x W`` grid, centre moved to (0, 0)."""
    k = np.asarray(kernel, dtype=np.float64)
    pad = np.zeros(shape)
    pad[: k.shape[0], : k.shape[1]] = k
    return np.fft.fft2(np.roll(pad, (-(k.shape[0] // 2), -(k.shape[1] // 2)), axis=(0, 1)))


def wiener_deconvolve(y, kernel, x_true=None, boundary: str = "circular", lam: float | None = None,
                      lam_grid=LAM_GRID) -> tuple[np.ndarray, float]:
    """Fourier Wiener/Tikhonov deconvolution ``X = conj(H) Y / (|H|^2 + lam)``; returns ``(x, lam)``.

    ``lam`` given: used as is. Otherwise, with ``x_true``: the ``lam`` of ``lam_grid`` with the best
    PSNR against ``x_true`` (oracle; see the module docstring); without it: ``1e-2``.
    Only ``boundary="circular"`` (the benchmark's blur) is supported. Output clipped to [0, 1].
    """
    if boundary != "circular":
        raise ValueError("wiener_deconvolve models circular blur only")
    y = np.squeeze(np.asarray(y, dtype=np.float64))
    h = _transfer(kernel, y.shape)
    yf = np.fft.fft2(y)

    def solve(l):
        return np.clip(np.fft.ifft2(np.conj(h) * yf / (np.abs(h) ** 2 + l)).real, 0.0, 1.0)

    if lam is not None:
        return solve(lam), float(lam)
    if x_true is None:
        return solve(1e-2), 1e-2
    x_true = np.squeeze(np.asarray(x_true, dtype=np.float64))
    best = max(lam_grid, key=lambda l: psnr(solve(l), x_true))
    return solve(best), float(best)


def bicubic_upsample(y_low, factor: int) -> np.ndarray:
    """Bicubic interpolation of ``[h, w]`` block means to ``[h f, w f]``, clipped to [0, 1].

    ``skimage.transform.resize(order=3)`` maps pixel centres to pixel centres, which is where
    a block mean lives (the block's centre).
    """
    from skimage.transform import resize

    y = np.squeeze(np.asarray(y_low, dtype=np.float64))
    out = resize(y, (y.shape[0] * factor, y.shape[1] * factor), order=3, mode="edge",
                 anti_aliasing=False, preserve_range=True)
    return np.clip(out, 0.0, 1.0)


def interpolate_points(values, rows, cols, n: int, method: str = "linear") -> np.ndarray:
    """``[n, n]`` field from values at nodes ``(rows, cols)``: ``scipy.interpolate.griddata``
    (``linear`` or ``cubic`` inside the convex hull, nearest neighbour outside it; or ``nearest``)."""
    from scipy.interpolate import griddata

    pts = np.stack([np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)], 1)
    values = np.asarray(values, dtype=np.float64)
    grid = tuple(np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij"))
    near = griddata(pts, values, grid, method="nearest")
    if method == "nearest":
        return near
    out = griddata(pts, values, grid, method=method)
    return np.where(np.isfinite(out), out, near)
