"""Training timestep samplers: uniform, and guided-diffusion's loss-second-moment resampler.

Both return importance weights so that weighting each sample's loss by them keeps the batch
mean an unbiased estimate of the uniform-timestep objective. Randomness comes only from the
torch.Generator passed to `sample`; the samplers' own state is their loss history, which
`state_dict` captures for checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from pipeline.errors import PipelineError

SAMPLER_NAMES = ("uniform", "loss-second-moment")


class TimestepSampler(ABC):
    """Distribution over the chain indices 0..num_timesteps-1 used to pick training timesteps."""

    kind: str

    def __init__(self, num_timesteps: int) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    @abstractmethod
    def probabilities(self) -> np.ndarray:
        """float64 (num_timesteps,) sampling probabilities, summing to 1."""

    def sample(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw timesteps and their importance weights 1 / (T p_t).

        Draws happen on the generator's device (CPU generators keep runs device-independent)
        and the results are moved to `device`.

        :return: t (batch_size,) int64 and weights (batch_size,) float32.
        """
        probs = torch.from_numpy(self.probabilities())
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probs[t])
        return t.to(device=device, dtype=torch.int64), weights.to(device=device, dtype=torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (N,) at timesteps t (N,); a no-op unless the sampler adapts."""

    def state_dict(self) -> dict:
        return {"kind": self.kind, "num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or int(state.get("num_timesteps", -1)) != self.num_timesteps:
            raise PipelineError(
                f"timestep sampler state is for {state.get('kind')!r} with {state.get('num_timesteps')} "
                f"timesteps, but this run uses {self.kind!r} with {self.num_timesteps}"
            )


class UniformSampler(TimestepSampler):
    """p_t = 1/T for every t; all weights are 1."""

    kind = "uniform"

    def probabilities(self) -> np.ndarray:
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps, dtype=np.float64)


class LossSecondMomentResampler(TimestepSampler):
    """Sample t in proportion to the root mean square of its recent losses (improved DDPM).

    Uniform until every t has `history_per_term` recorded losses; then
    p_t = (1 - uniform_prob) * sqrt(E[loss_t^2]) / sum_s sqrt(E[loss_s^2]) + uniform_prob / T,
    the expectation being over the last `history_per_term` losses recorded at t.
    """

    kind = "loss-second-moment"

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self.loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    @property
    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def probabilities(self) -> np.ndarray:
        if not self.warmed_up:
            return np.full(self.num_timesteps, 1.0 / self.num_timesteps, dtype=np.float64)
        weights = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        weights /= weights.sum()
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / self.num_timesteps
        # Renormalise: the mixture sums to 1 only up to rounding.
        return weights / weights.sum()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each loss to its timestep's history, dropping the oldest once it is full.

        :param t: (N,) chain indices; :param losses: (N,) per-sample unweighted losses. In a
        multi-process run, gather both over all processes first so every copy stays identical.
        """
        t_list = t.detach().cpu().to(torch.int64).tolist()
        loss_list = losses.detach().cpu().to(torch.float64).tolist()
        if len(t_list) != len(loss_list):
            raise ValueError(f"{len(t_list)} timesteps but {len(loss_list)} losses")
        for step, loss in zip(t_list, loss_list):
            if self.loss_counts[step] == self.history_per_term:
                self.loss_history[step, :-1] = self.loss_history[step, 1:]
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, self.loss_counts[step]] = loss
                self.loss_counts[step] += 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            history_per_term=self.history_per_term,
            uniform_prob=self.uniform_prob,
            loss_history=torch.from_numpy(self.loss_history.copy()),
            loss_counts=torch.from_numpy(self.loss_counts.copy()),
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if int(state["history_per_term"]) != self.history_per_term or float(state["uniform_prob"]) != self.uniform_prob:
            raise PipelineError(
                f"timestep sampler state has history {state['history_per_term']} and uniform_prob "
                f"{state['uniform_prob']}, but this run uses {self.history_per_term} and {self.uniform_prob}"
            )
        self.loss_history = state["loss_history"].to(torch.float64).numpy().copy()
        self.loss_counts = state["loss_counts"].to(torch.int64).numpy().copy()


def create_timestep_sampler(name: str, num_timesteps: int) -> TimestepSampler:
    """The sampler named like guided-diffusion's --schedule_sampler flag."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise PipelineError(f"unknown timestep sampler {name!r}; expected one of {SAMPLER_NAMES}")
