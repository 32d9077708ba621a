"""Gaussian KL divergence and the discretized-Gaussian likelihood of 8-bit images.

These are the two pieces of the variational bound: KL terms for steps t > 0 and the decoder
negative log-likelihood at t = 0. Results are in nats, elementwise; the caller averages and
converts to bits.
"""

from __future__ import annotations

import math

import torch

# Images live on the grid k / 127.5 - 1, k = 0..255, so each bin has half-width 1/255.
_BIN_HALF_WIDTH = 1.0 / 255.0
# Values beyond this are the edge bins -1 and +1, which extend to -inf and +inf.
_EDGE = 0.999
_LOG_FLOOR = 1e-12


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    All arguments broadcast against each other; the result has their broadcast shape.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF, elementwise (as in guided-diffusion)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability, in nats, of 8-bit images x under a Gaussian integrated over each pixel bin.

    :param x: (N, ...) images in [-1, 1] on the 8-bit grid.
    :param means: (N, ...) Gaussian means.
    :param log_scales: (N, ...) log standard deviations (half the log-variance).
    :return: (N, ...) elementwise log-likelihoods.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _BIN_HALF_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _BIN_HALF_WIDTH))

    # Floors keep the logs finite when a bin carries (numerically) no mass.
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=_LOG_FLOOR))

    return torch.where(
        x < -_EDGE,
        log_cdf_upper,
        torch.where(x > _EDGE, log_one_minus_cdf_lower, log_bin_mass),
    )
