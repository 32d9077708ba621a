"""The recipe's optimizer: the base alone, SAM around it, or fSGLD on it.

Every optimizer built here takes one training step as `optimizer.step(closure)`, where the
closure runs forward and backward at the current weights (see pipeline.training.step). Plain
torch optimizers call it once; SAM twice (at theta, then at theta + e); fSGLD once per draw.
"""

from __future__ import annotations

import torch

from pipeline import seeding
from pipeline.optim.fsgld import FSGLD
from pipeline.optim.sam import SAM
from pipeline.recipes import Recipe, base_optimizer_class, check_fsgld_base


def build_optimizer(model: torch.nn.Module, recipe: Recipe, seed: int) -> torch.optim.Optimizer:
    """The recipe's optimizer over the model's parameters (one group, in model order)."""
    base_cls, base_kwargs = base_optimizer_class(recipe)
    params = list(model.parameters())
    if recipe.sam is not None:
        return SAM(params, base_cls, rho=recipe.sam["rho"], adaptive=recipe.sam["adaptive"],
                   asam_eta=recipe.sam["asam_eta"], m_sharpness=recipe.sam.get("m_sharpness", False),
                   **base_kwargs)
    if recipe.fsgld is not None:
        f = recipe.fsgld
        check_fsgld_base(recipe)
        base = "sgd" if recipe.optimizer["name"] == "sgd" else "adam"
        extra = {} if base == "sgd" else {"betas": base_kwargs["betas"]}
        return FSGLD(params, lr=base_kwargs["lr"], seed=seeding.derive_seed(seed, stream="fsgld"),
                     beta_inv=f["beta_inv"], eta=f["eta"], sigma=f["sigma"], n_pert=f["n_pert"],
                     antithetic=f["antithetic"], base=base, weight_decay=base_kwargs["weight_decay"],
                     **extra)
    return base_cls(params, **base_kwargs)
