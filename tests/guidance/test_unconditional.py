"""Unconditional ODE solvers against the exact flow of the analytic grf-32 prior.

For the Gaussian prior (spectrum ``lambda_k``) the probability-flow ODE ``dx/dsigma = (x - D(x)) / sigma``
is diagonal in Fourier space, ``x_k(s) = x_k(S) sqrt((lambda_k + s^2) / (lambda_k + S^2))``, and maps
``N(0, S^2 I + C)`` to ``N(0, s^2 I + C)``: the samples' covariance must be the prior's.
"""
import math

import pytest
import torch

from guidance.core import DivergedError, dpmpp_2m_step, euler_step, heun_step
from guidance.unconditional import SOLVERS, sample_unconditional, solver_nfe, steps_for_nfe
from models.denoiser import CountingDenoiser
from models.grf import GRFDenoiser
from models.schedules import get_sigmas

DEN = GRFDenoiser(32)
SMIN, SMAX = DEN.sigma_min, DEN.sigma_max


def karras(n):
    return get_sigmas("karras", n, SMIN, SMAX)


def exact_flow(x_start):
    """The ODE's exact solution from ``SMAX`` to ``SMIN``, then the last step (to 0) every
    solver takes: ``x = D(x, SMIN)``."""
    gain = torch.sqrt((DEN.lam + SMIN ** 2) / (DEN.lam + SMAX ** 2))
    return DEN(torch.fft.ifft2(gain * torch.fft.fft2(x_start)).real, SMIN)


@pytest.fixture(scope="module")
def start():
    return SMAX * torch.randn((8, 1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(start):
    """Many Heun steps of the same ODE from the same noise."""
    return sample_unconditional(DEN, karras(200), 0, None, "heun", x=start.clone())


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_heun_reference_is_the_exact_flow(start, reference):
    assert rel(reference, exact_flow(start)) < 3e-4


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order(start, reference, solver, order):
    """Halving the step (10 -> 20 steps) divides the error by about 2^order."""
    e10, e20 = (rel(sample_unconditional(DEN, karras(n), 0, None, solver, x=start.clone()), reference)
                for n in (10, 20))
    ratio = e10 / e20
    assert 0.8 * 2 ** order < ratio < 1.5 * 2 ** order, (solver, e10, e20, ratio)
    if solver == "dpmpp_2m":
        assert e20 < 0.03


def band_ratios(power):
    """Per radial band of wavenumbers: the band's variance over the prior's."""
    k = torch.fft.fftfreq(32, 1 / 32)
    radius = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round()
    bands = [radius == r for r in radius.unique()]
    return [float(power[b].sum() / DEN.lam[b].sum()) for b in bands], [int(b.sum()) for b in bands]


def sampler_spectrum(solver, steps):
    """The exact variance of each Fourier mode of the samples, started from ``N(0, SMAX^2 I + C)``.
    With the exact Gaussian denoiser every solver is a linear, shift-equivariant map, so its
    response to a unit impulse gives the gain ``m_k`` of each mode: variance ``m_k^2 (SMAX^2 + lambda_k)``."""
    impulse = torch.zeros((1, 1, 32, 32), dtype=torch.float64)
    impulse[..., 0, 0] = 1
    gain = torch.fft.fft2(sample_unconditional(DEN, karras(steps), 0, None, solver, x=impulse)[0, 0]).real
    return gain ** 2 * (SMAX ** 2 + DEN.lam)


def test_samples_have_the_prior_covariance():
    """1024 DPM-Solver++(2M) samples (50 steps) from the ODE's exact marginal at SMAX: their
    power spectrum (radially binned) and pixel variance match the prior's within Monte Carlo
    error plus 3 %, and the sampler's exact covariance is within 1 % of the prior's."""
    num, steps = 1024, 50
    g = torch.Generator().manual_seed(1)
    x_start = SMAX * torch.randn((num, 1, 32, 32), generator=g, dtype=torch.float64) + DEN.sample_prior(num, g)
    x = sample_unconditional(DEN, karras(steps), 0, None, "dpmpp_2m", x=x_start)
    ratios, sizes = band_ratios(torch.fft.fft2(x[:, 0], norm="ortho").abs().square().mean(0))
    for r, (ratio, size) in enumerate(zip(ratios[:12], sizes)):  # the low bands carry nearly all the variance
        tol = 4 * math.sqrt(2 / (num * size)) + 0.03
        assert abs(ratio - 1) < tol, (r, ratio, tol)
    assert abs(float(x.var()) - 1) < 0.12  # unit pixel variance (81 % of it in the mean, one mode)
    spectrum = sampler_spectrum("dpmpp_2m", steps)
    assert float((spectrum - DEN.lam).norm() / DEN.lam.norm()) < 0.01  # = the covariance's Frobenius error
    assert max(abs(r - 1) for r in band_ratios(spectrum)[0]) < 0.03


def test_covariance_error_falls_at_second_order():
    """The exact covariance error (relative Frobenius) of DPM-Solver++(2M) and Heun falls about
    4x from 20 to 40 steps, Euler's 2x; at about 20 network calls DPM-Solver++(2M) is the closest
    (measured: 0.022, against 0.105 for 10 Heun steps and 0.14 for 20 Euler steps)."""
    def err(solver, steps):
        return float((sampler_spectrum(solver, steps) - DEN.lam).norm() / DEN.lam.norm())
    assert 1.7 < err("euler", 20) / err("euler", 40) < 2.3
    for solver in ("heun", "dpmpp_2m"):
        assert 3.4 < err(solver, 20) / err(solver, 40) < 5.5, solver
    assert err("dpmpp_2m", 20) < 0.3 * min(err("heun", 10), err("euler", 20))


def test_steps_and_network_calls():
    for solver in SOLVERS:
        den = CountingDenoiser(DEN)
        sample_unconditional(den, karras(6), 2, torch.Generator().manual_seed(0), solver)
        assert den.nfe == solver_nfe(solver, 6) == (11 if solver == "heun" else 6)
        assert solver_nfe(solver, steps_for_nfe(solver, 20)) <= 20
    assert steps_for_nfe("heun", 20) == 10 and steps_for_nfe("dpmpp_2m", 20) == 20
    with pytest.raises(ValueError):
        sample_unconditional(DEN, karras(3), 1, None, "rk4")


def test_every_solver_starts_from_the_same_noise():
    seen = {}
    for solver in SOLVERS:
        first = []

        def spy(x, sigma, first=first):
            if not first:
                first.append(x.clone())
            return DEN(x, sigma)
        spy.shape = DEN.shape
        sample_unconditional(spy, karras(3), 2, torch.Generator().manual_seed(4), solver)
        seen[solver] = first[0]
    for solver in SOLVERS:
        assert torch.equal(seen[solver], seen["euler"])


def test_step_cores_agree_where_they_must():
    g = torch.Generator().manual_seed(2)
    x = 3 * torch.randn((2, 1, 32, 32), generator=g, dtype=torch.float64)
    x0, x0_prev = DEN(x, 3.0), DEN(x, 5.0)
    # the first-order exponential step (DDIM) is the Euler step in sigma-space
    torch.testing.assert_close(dpmpp_2m_step(x, x0, 3.0, 1.5), euler_step(x, x0, 3.0, 1.5), rtol=0, atol=1e-12)
    # a denoiser output that does not change between steps needs no correction
    torch.testing.assert_close(dpmpp_2m_step(x, x0, 3.0, 1.5, x0, 5.0), dpmpp_2m_step(x, x0, 3.0, 1.5))
    assert not torch.allclose(dpmpp_2m_step(x, x0, 3.0, 1.5, x0_prev, 5.0), dpmpp_2m_step(x, x0, 3.0, 1.5))
    # to sigma = 0 every step lands on the denoiser's output
    assert torch.equal(dpmpp_2m_step(x, x0, 3.0, 0.0, x0_prev, 5.0), x0)
    torch.testing.assert_close(euler_step(x, x0, 3.0, 0.0), x0, rtol=0, atol=1e-12)
    x_last, x0_last = heun_step(DEN, x, 3.0, 0.0)
    torch.testing.assert_close(x_last, x0, rtol=0, atol=1e-12)
    assert torch.equal(x0_last, x0)


def test_a_non_finite_state_stops_the_run():
    def bad(x, sigma):
        return torch.full_like(x, float("nan"))
    bad.shape = DEN.shape
    with pytest.raises(DivergedError):
        sample_unconditional(bad, karras(4), 1, None, "dpmpp_2m")
