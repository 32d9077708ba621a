"""Noise schedules, timestep respacing and the float64 tables of a Gaussian diffusion.

Everything here is numpy float64, computed with the same formulas as openai/guided-diffusion so
that the tables agree with the reference to rounding (see /work/shared/reference/README.md,
points 8 and 10). Torch only enters in `gaussian.py`, which indexes these tables by timestep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from pipeline.errors import PipelineError

SCHEDULE_NAMES = ("linear", "cosine")


def named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Return the betas of a named schedule as a float64 array of shape (num_timesteps,).

    "linear" is the DDPM schedule (1e-4 to 0.02 at T = 1000), rescaled so that other T keep the
    same overall noise; "cosine" is the improved-DDPM schedule with beta capped at 0.999.
    """
    if num_timesteps < 1:
        raise PipelineError(f"num_timesteps must be positive, got {num_timesteps}")
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return _betas_from_alpha_bar(num_timesteps, _cosine_alpha_bar, max_beta=0.999)
    raise PipelineError(f"unknown noise schedule {name!r}; expected one of {SCHEDULE_NAMES}")


def _cosine_alpha_bar(s: float) -> float:
    # abar(s) for continuous time s in [0, 1]; the 0.008 offset keeps beta_0 away from zero.
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _betas_from_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float) -> np.ndarray:
    # A scalar Python loop on purpose: it rounds exactly like the reference, whereas a vectorised
    # version drifts by ~1e-13 relative, which the cumulative products then carry along.
    betas = []
    for i in range(num_timesteps):
        ratio = alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps)
        betas.append(min(1 - ratio, max_beta))
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Choose which of the original timesteps 0..num_timesteps-1 a shorter chain keeps.

    `section_counts` is either "ddimN" (the smallest integer stride s with
    len(range(0, T, s)) == N), a comma string such as "10,5", or a list of ints. With counts
    [c_1, ..., c_m] the T steps are cut into m near-equal sections (the first T % m sections one
    step longer) and section i keeps c_i steps spread evenly over it, first and last included.
    The positions are round(x) for x = 0, s, s + s, ... (repeated float addition, Python's
    round-half-to-even), exactly as guided-diffusion does, because the two differ for some counts.

    Returns the kept timesteps, sorted and without duplicates.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, section_counts)
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise PipelineError(
                f"timestep respacing {section_counts!r} is not 'ddimN' or a comma list of integers"
            ) from None
    section_counts = list(section_counts)
    if not section_counts:
        raise PipelineError("timestep respacing needs at least one section count")

    size_per_section, extra = divmod(num_timesteps, len(section_counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per_section + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise PipelineError(
                f"cannot keep {count} steps from a section of {size} steps "
                f"(respacing {section_counts} of {num_timesteps} timesteps)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


def _ddim_timesteps(num_timesteps: int, spec: str) -> list[int]:
    try:
        desired = int(spec[len("ddim"):])
    except ValueError:
        raise PipelineError(f"timestep respacing {spec!r}: expected 'ddim' followed by an integer") from None
    for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired:
            return list(steps)
    raise PipelineError(f"no integer stride gives exactly {desired} steps out of {num_timesteps}")


@dataclass(frozen=True)
class DiffusionTables:
    """The 13 float64 tables of a diffusion with K steps, each of shape (K,).

    Names and formulas follow guided-diffusion's GaussianDiffusion attributes. The posterior
    tables describe q(x_{k-1} | x_k, x_0) of *this* chain, so a respaced chain gets its own.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray | Sequence[float]) -> "DiffusionTables":
        """Build every table from betas of shape (K,), 0 < beta <= 1, in float64."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)

        # Posterior q(x_{k-1} | x_k, x_0). Its variance is 0 at k = 0, so the log is taken with
        # element 0 replaced by element 1 to stay finite.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))

        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            alphas_cumprod_next=alphas_cumprod_next,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        """The 13 tables by name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def respace_betas(betas: np.ndarray, kept_timesteps: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Betas of the short chain that visits only `kept_timesteps` of the chain with `betas`.

    beta'_k = 1 - abar[t_k] / abar[t_{k-1}] with abar = 1 before the first kept step, so the
    short chain has exactly the cumulative noise levels abar[t_k] of the long one at its steps.

    Returns (new betas float64 of shape (K,), timestep_map), where timestep_map[k] = t_k.
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64), axis=0)
    kept = sorted(set(int(t) for t in kept_timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= alphas_cumprod.shape[0]:
        raise ValueError(f"kept timesteps must be a non-empty subset of 0..{alphas_cumprod.shape[0] - 1}")
    new_betas = []
    last_alpha_cumprod = 1.0
    for t in kept:
        new_betas.append(1 - alphas_cumprod[t] / last_alpha_cumprod)
        last_alpha_cumprod = alphas_cumprod[t]
    return np.array(new_betas, dtype=np.float64), kept
