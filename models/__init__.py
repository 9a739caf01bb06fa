"""Score networks behind one contract ``D(x, sigma) -> x0_hat``; schedules; checkpoints; priors."""
from .denoiser import CountingDenoiser, Denoiser, EDMPrecond, FlowDenoiser, VEDenoiser, VPDenoiser
from .grf import GRFDenoiser, grf_spectrum
from .schedules import get_sigmas

__all__ = ["CountingDenoiser", "Denoiser", "EDMPrecond", "FlowDenoiser", "VEDenoiser", "VPDenoiser", "GRFDenoiser",
           "grf_spectrum", "get_sigmas"]
