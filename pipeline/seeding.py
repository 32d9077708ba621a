"""Counter-based seeds: every random draw is a pure function of (seed, counters, stream).

Training and sampling derive their generators from (seed, step) or (seed, image index) instead
of carrying RNG state forward, so a resumed run, a different batch size or a different number of
processes draws exactly the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream names keep draws for different purposes independent even at the same counters.
STREAMS = {"init": 0, "timesteps": 1, "noise": 2, "input_perturbation": 3, "dropout": 4,
           "fsgld": 5, "sample": 6, "eval_set": 7, "directions": 8, "probes": 9,
           "calibration": 10}


def derive_seed(seed: int, *counters: int, stream: str) -> int:
    """A 63-bit seed mixed from the base seed, the counters and the stream name."""
    entropy = [int(seed), STREAMS[stream], *[int(c) for c in counters]]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *counters: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with derive_seed(...)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *counters, stream=stream))
