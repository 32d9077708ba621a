"""A training recipe resolved from config: the base optimizer plus the optional pieces.

A recipe is `training.optimizer` overridden by the recipe's own `optimizer` entry, plus at most
these pieces, each under its own key and switched on by being present:

- `input_perturbation: {gamma}` (DDPM-IP): x_t is built from eps + gamma * xi; the target stays eps.
- `sam: {rho, adaptive, asam_eta, m_sharpness}`: SAM (or ASAM) around the base optimizer;
  m_sharpness: with several data-parallel processes, each ascends along its own gradient.
- `fsgld: {beta_inv, eta, sigma, n_pert, antithetic}`: flatness-aware SGLD. With an SGD base this is
  the paper's form; with an Adam base it is this project's extension and is labelled so.

SAM and fSGLD both own the gradient evaluation point, so they exclude each other.

A recipe classifies itself once, here: its `kind` (the report's row order and every "is this a
SAM / fSGLD / IP recipe" question), its `base` (which plain recipe it is compared with), its
`label` (how tables name it) and its `step_kind` (what a training step costs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pipeline.config import deep_merge
from pipeline.errors import PipelineError

SAM_DEFAULTS = {"rho": 0.1, "adaptive": False, "asam_eta": 0.0, "m_sharpness": False}
FSGLD_DEFAULTS = {"beta_inv": 1e-8, "eta": 0.01, "sigma": None, "n_pert": 1, "antithetic": False}
# Recipe kinds in the paper's row order (ADM, +IP, +SAM), then this project's SGD and fSGLD rows.
KINDS = ("adm", "ip", "sam", "sgd", "fsgld")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: dict[str, Any]
    ip_gamma: float = 0.0
    sam: dict[str, Any] | None = None
    fsgld: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """One of KINDS: fsgld or sam when present (IP may come with either), else ip, else the
        plain base: sgd, or adm for AdamW."""
        if self.fsgld is not None:
            return "fsgld"
        if self.sam is not None:
            return "sam"
        if self.ip_gamma:
            return "ip"
        return "sgd" if self.optimizer["name"] == "sgd" else "adm"

    @property
    def is_plain(self) -> bool:
        """The base optimizer alone (no IP, SAM or fSGLD): the baseline of recipes of its base."""
        return self.kind in ("adm", "sgd")

    @property
    def base(self) -> tuple[str, float]:
        """The base optimizer and learning rate; a recipe is compared with the plain one of its base."""
        return self.optimizer["name"], float(self.optimizer["lr"])

    @property
    def step_kind(self) -> str:
        """What decides a training step's cost: the base optimizer and the pieces that add passes
        ('adamw', 'adamw+ip+sam', 'sgd+fsgld1', ...)."""
        kind = self.optimizer["name"]
        if self.ip_gamma:
            kind += "+ip"
        if self.sam is not None:
            kind += "+sam"
        if self.fsgld is not None:
            kind += f"+fsgld{int(self.fsgld['n_pert'])}"
        return kind

    @property
    def label(self) -> str:
        """How tables name the recipe's training: 'ADM', 'SGD', '+SAM', '+IP', '+fSGLD (Adam base, ext.)'..."""
        parts = []
        if self.ip_gamma:
            parts.append("+IP")
        if self.sam is not None:
            parts.append("+ASAM" if self.sam["adaptive"] else "+SAM")
        if self.fsgld is not None:
            parts.append("+fSGLD" if self.optimizer["name"] == "sgd" else "+fSGLD (Adam base, ext.)")
        # A plain SGD run is the baseline of the faithful (SGD-base) fSGLD, not ADM.
        return "".join(parts) or ("SGD" if self.optimizer["name"] == "sgd" else "ADM")

    def describe(self) -> dict[str, Any]:
        """Everything that defines the recipe, for provenance attributes."""
        return {"name": self.name, "label": self.label, "optimizer": self.optimizer,
                "input_perturbation": {"gamma": self.ip_gamma} if self.ip_gamma else None,
                "sam": self.sam, "fsgld": self.fsgld}


def resolve_recipe(config: Mapping[str, Any], name: str) -> Recipe:
    """Build the named recipe from config['recipes'][name] over config['training']['optimizer']."""
    recipes = config.get("recipes") or {}
    if name not in recipes:
        raise PipelineError(f"unknown recipe '{name}'; config.yaml defines: {', '.join(sorted(recipes))}.")
    # Keys, types and ranges (sam and fsgld apart included) are the schema's, checked before a
    # recipe is resolved; here only what it cannot express.
    spec = recipes[name] or {}
    optimizer = deep_merge(config.get("training", {}).get("optimizer", {}), spec.get("optimizer") or {})
    ip_gamma = float((spec.get("input_perturbation") or {}).get("gamma", 0.0))
    sam = deep_merge(SAM_DEFAULTS, spec["sam"] or {}) if "sam" in spec else None
    fsgld = deep_merge(FSGLD_DEFAULTS, spec["fsgld"] or {}) if "fsgld" in spec else None
    momentum = float(optimizer.get("momentum") or 0.0)
    if optimizer["name"] == "adamw" and momentum != 0.0:
        raise PipelineError(f"recipe '{name}': optimizer.momentum = {momentum} has no effect on adamw "
                            f"(its betas play that role); set it to 0 or use name: sgd.")
    recipe = Recipe(name=name, optimizer=optimizer, ip_gamma=ip_gamma, sam=sam, fsgld=fsgld)
    check_fsgld_base(recipe)
    if fsgld is not None and fsgld["antithetic"] and fsgld["n_pert"] != 2:
        raise PipelineError(f"recipe '{name}': fsgld.antithetic pairs +eps with -eps, so it needs "
                            f"fsgld.n_pert: 2, got {fsgld['n_pert']}.")
    return recipe


def check_fsgld_base(recipe: Recipe) -> None:
    """fSGLD on an SGD base takes no momentum (also checked where a recipe comes from --settings)."""
    momentum = float(recipe.optimizer.get("momentum") or 0.0)
    if recipe.fsgld is not None and recipe.optimizer["name"] == "sgd" and momentum != 0.0:
        raise PipelineError(f"recipe '{recipe.name}': fSGLD's SGD base has no momentum (the Langevin dynamics "
                            f"it samples are first order); set optimizer.momentum: 0.")


def base_optimizer_class(recipe: Recipe) -> tuple[type, dict[str, Any]]:
    """The torch optimizer class and its keyword arguments for the recipe's base."""
    import torch  # here, so that resolving config (Snakefile) does not import torch

    opt = recipe.optimizer
    if opt["name"] == "adamw":
        return torch.optim.AdamW, {"lr": float(opt["lr"]), "weight_decay": float(opt["weight_decay"]),
                                   "betas": tuple(float(b) for b in opt["betas"])}
    return torch.optim.SGD, {"lr": float(opt["lr"]), "weight_decay": float(opt["weight_decay"]),
                             "momentum": float(opt.get("momentum", 0.0))}


def recipe_from_description(described: Mapping[str, Any]) -> Recipe:
    """Rebuild a Recipe from `Recipe.describe()` (as stored in run settings)."""
    ip = described.get("input_perturbation")
    return Recipe(name=described["name"], optimizer=dict(described["optimizer"]),
                  ip_gamma=float(ip["gamma"]) if ip else 0.0,
                  sam=described.get("sam"), fsgld=described.get("fsgld"))
