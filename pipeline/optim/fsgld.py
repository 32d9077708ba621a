"""fSGLD: flatness-aware stochastic gradient Langevin dynamics (Bruno, Hwang, An, Sabanis, Lim 2025).

Per step k with learning rate lr (faithful form, SGD base without momentum):

    eps_k ~ N(0, sigma^2 I)                         one draw over all parameters, whole minibatch
    g_k   = grad L_B(theta_k + eps_k)               averaged over n_pert draws
    theta_{k+1} = theta_k - lr * (g_k + wd * theta_k) + sqrt(2 * lr * beta_inv) * xi_k,  xi_k ~ N(0, I)

with the coupling sigma = beta_inv ** ((1 + eta) / 4). Since E[grad L(theta + eps)] is the gradient
of L smoothed by the Gaussian, ~ L + sigma^2/2 tr H, this is SGLD on a Hessian-trace-regularised
loss. The reference code adds the Langevin noise before its SGD step (so weight decay also sees
the noise); here it is added after the base step, as in the formula above. The two differ by
lr * wd * noise, about 1e-9 per coordinate at the defaults.

base="adam" is OUR EXTENSION, not in the fSGLD paper or code: the same perturbed gradient is fed to
AdamW, then the same isotropic Langevin noise is added to the weights. The theory does not cover
it (the noise is not preconditioned).

The training loop drives one step as:

    opt.zero_grad()
    for _ in range(opt.n_pert):
        opt.perturb()                 # theta <- theta + eps (exact copy of theta kept)
        loss_at(theta).backward()     # gradients accumulate over the draws
        opt.restore()                 # theta back, bit for bit
    opt.step()                        # base step with grad / n_pert, then Langevin noise

or as `opt.step(closure)`, the contract every recipe's optimizer shares (pipeline.training.step).

All random numbers come from one torch.Generator owned by the optimiser, living on the
parameters' device (a CUDA generator for CUDA parameters), so draws never leave the device. Its
state is part of state_dict(): a resumed run continues bit for bit on the same device type.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from pipeline.errors import PipelineError

BASES = ("sgd", "adam")
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adam": 0.0}  # fSGLD code / ADM
# Settings that define the chain: a checkpoint made with other values is a different run.
_CHAIN_KEYS = ("base", "beta_inv", "eta", "sigma", "sigma_mode", "n_pert", "antithetic")


def coupled_sigma(beta_inv: float, eta: float) -> float:
    """The perturbation scale tied to the temperature: sigma = beta_inv ** ((1 + eta) / 4)."""
    return beta_inv ** ((1.0 + eta) / 4.0)


class FSGLD(torch.optim.Optimizer):
    """fSGLD over a base optimiser (torch SGD with momentum 0, or AdamW as our extension).

    Args:
        params: parameters or param-group dicts, all on one device.
        lr: learning rate of the base step; the Langevin noise uses each group's current lr.
        seed: seed of the optimiser's own generator (perturbations and Langevin noise).
        beta_inv: inverse temperature beta^-1 (mean-loss scale); 0 turns the Langevin noise off.
        eta: coupling exponent, > 0; used only when sigma is None.
        sigma: None couples sigma to beta_inv; a number decouples it (the paper's ablation).
        n_pert: perturbation draws per step; their gradients are averaged.
        antithetic: with n_pert = 2, the second draw is -eps of the first.
        base: "sgd" (faithful) or "adam" (AdamW; our extension, not in the paper).
        weight_decay: None picks 5e-4 for sgd (fSGLD code) and 0.0 for adam (ADM).
        betas, eps: AdamW settings, used only with base="adam".

    Memory: two parameter-sized buffers (exact copies for restore, and the noise draw), both
    allocated on the first perturb() and reused every step.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        seed: int,
        beta_inv: float = 1e-8,
        eta: float = 0.01,
        sigma: float | None = None,
        n_pert: int = 1,
        antithetic: bool = False,
        base: str = "sgd",
        weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"fSGLD base must be one of {BASES}, got {base!r}")
        if lr < 0.0 or beta_inv < 0.0:
            raise ValueError(f"fSGLD needs lr >= 0 and beta_inv >= 0, got lr={lr}, beta_inv={beta_inv}")
        if sigma is None and eta <= 0.0:
            raise ValueError(f"fSGLD coupling needs eta > 0, got {eta}")
        if sigma is not None and sigma < 0.0:
            raise ValueError(f"fSGLD sigma must be >= 0, got {sigma}")
        if n_pert < 1:
            raise ValueError(f"fSGLD n_pert must be >= 1, got {n_pert}")
        if antithetic and n_pert != 2:
            raise ValueError(f"antithetic fSGLD pairs +eps and -eps, so it needs n_pert = 2, got {n_pert}")
        if weight_decay is None:
            weight_decay = DEFAULT_WEIGHT_DECAY[base]

        if base == "sgd":
            base_cls, base_kwargs = torch.optim.SGD, dict(lr=lr, momentum=0.0, weight_decay=weight_decay)
        else:
            base_cls, base_kwargs = torch.optim.AdamW, dict(lr=lr, betas=tuple(betas), eps=eps,
                                                            weight_decay=weight_decay)
        super().__init__(params, dict(base_kwargs))

        # Share the group dicts with the base optimiser, so lr schedules reach both.
        self.base_optimizer = base_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

        self.base = base
        self.lr = lr
        self.weight_decay = weight_decay
        self.beta_inv = beta_inv
        self.eta = eta
        self.sigma_mode = "coupled" if sigma is None else "decoupled"
        self.sigma = coupled_sigma(beta_inv, eta) if sigma is None else float(sigma)
        self.n_pert = n_pert
        self.antithetic = antithetic
        self.betas = tuple(betas)
        self.eps = eps
        self.seed = seed

        self.device = self._single_device()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

        self._buffers: _Buffers | None = None
        self._perturbed = False
        self._draws_done = 0  # perturbations since the last step()

    def describe(self) -> dict[str, Any]:
        """Plain settings for provenance records (YAML/JSON-safe)."""
        info: dict[str, Any] = {
            "optimizer": "fSGLD",
            "base": self.base,
            "base_optimizer": "torch.optim.SGD (momentum 0)" if self.base == "sgd" else "torch.optim.AdamW",
            "faithful": self.base == "sgd",
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "beta_inv": self.beta_inv,
            "eta": self.eta,
            "sigma": self.sigma,
            "sigma_mode": self.sigma_mode,
            "n_pert": self.n_pert,
            "antithetic": self.antithetic,
            "perturbation": "gaussian",
            "langevin_noise": "sqrt(2 * lr * beta_inv) * N(0, I), added after the base step",
            "seed": self.seed,
            "rng_device": self.device.type,
        }
        if self.sigma_mode == "coupled":
            info["sigma_rule"] = "sigma = beta_inv ** ((1 + eta) / 4)"
        else:
            info["sigma_rule"] = "decoupled ablation: sigma fixed by the user, eta unused"
        if self.base == "adam":
            info["betas"] = list(self.betas)
            info["eps"] = self.eps
            info["note"] = ("OUR EXTENSION, not in the fSGLD paper or code: the perturbed gradient "
                            "is fed to AdamW and unpreconditioned Langevin noise is added after "
                            "the step; the fSGLD theory does not cover this variant")
        return info

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:
            # Called by Optimizer.__init__ before the base optimiser exists.
            super().add_param_group(param_group)
            return
        base.add_param_group(param_group)
        self._single_device()
        self._buffers = None

    @property
    def is_perturbed(self) -> bool:
        """True between perturb() and restore()."""
        return self._perturbed

    @torch.no_grad()
    def perturb(self) -> None:
        """theta <- theta + eps, eps ~ N(0, sigma^2 I); keeps an exact copy of theta.

        With antithetic draws the second call of a step uses -eps of the first.
        """
        if self._perturbed:
            raise RuntimeError("fSGLD.perturb() called twice without restore()")
        if self._draws_done >= self.n_pert:
            raise RuntimeError(f"fSGLD.perturb() called more than n_pert={self.n_pert} times before step()")
        buffers = self._get_buffers()
        torch._foreach_copy_(buffers.saved, buffers.params)
        if self.sigma > 0.0:
            if self.antithetic and self._draws_done == 1:
                # The noise buffer still holds the first draw of this step.
                torch._foreach_add_(buffers.params, buffers.noise, alpha=-self.sigma)
            else:
                buffers.draw(self.generator)
                torch._foreach_add_(buffers.params, buffers.noise, alpha=self.sigma)
        self._perturbed = True
        self._draws_done += 1

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the parameters saved by perturb(), bit for bit; a no-op when not perturbed."""
        if not self._perturbed:
            return
        buffers = self._get_buffers()
        torch._foreach_copy_(buffers.params, buffers.saved)
        self._perturbed = False

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Base step with the gradient averaged over the n_pert draws, then Langevin noise.

        Without a closure the loop must have done n_pert perturb()/backward/restore() rounds.
        With a closure (forward + backward at the current weights, returning the loss) the whole
        step runs here: zero_grad, n_pert rounds, base step, noise; the mean loss is returned.
        Every draw but the last is called with `all_reduce=False` (the last backward reduces the
        summed gradient once), and the last with `report=n_pert`, as pipeline.training.step says.
        """
        loss = None
        if closure is not None:
            loss = self._run_closure(closure)
        if self._perturbed:
            raise RuntimeError("fSGLD.step() called while perturbed: call restore() first")
        if self._draws_done != self.n_pert:
            raise RuntimeError(f"fSGLD.step() expects {self.n_pert} perturb() rounds since the last "
                               f"step, got {self._draws_done}")
        self._draws_done = 0

        with_grad = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        if self.n_pert > 1:
            grads = [p.grad for params in with_grad for p in params]
            if grads:
                torch._foreach_div_(grads, float(self.n_pert))
        self.base_optimizer.step()

        # Langevin noise, only on parameters the base step moved (torch skips grad-less ones).
        noise_std = [math.sqrt(2.0 * float(group["lr"]) * self.beta_inv) for group in self.param_groups]
        if any(std > 0.0 for std in noise_std):
            buffers = self._get_buffers()
            buffers.draw(self.generator)
            for params, std in zip(with_grad, noise_std):
                if params and std > 0.0:
                    torch._foreach_add_(params, [buffers.noise_of[p] for p in params], alpha=std)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state_dict plus an "fsgld" entry: generator state and settings."""
        if self._perturbed or self._draws_done:
            raise RuntimeError("fSGLD.state_dict() called in the middle of a step")
        state = self.base_optimizer.state_dict()
        state["fsgld"] = {
            "generator_state": self.generator.get_state(),
            "generator_device": self.device.type,
            "settings": self.describe(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load base state, groups and the generator state; the chain settings must match."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("fsgld", None)
        if extra is None:
            raise PipelineError("optimizer checkpoint has no 'fsgld' entry: it was not written by fSGLD")
        saved, current = extra["settings"], self.describe()
        changed = [f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}"
                   for k in _CHAIN_KEYS if saved.get(k) != current[k]]
        if changed:
            raise PipelineError("fSGLD checkpoint was made with other settings; resuming would mix "
                                "two chains (" + "; ".join(changed) + ")")
        if extra["generator_device"] != self.device.type:
            raise PipelineError(f"fSGLD checkpoint drew its noise on {extra['generator_device']}, this "
                                f"run is on {self.device.type}: a bit-identical resume is impossible; "
                                "resume on the same device type")
        self.base_optimizer.load_state_dict(state_dict)
        # torch rebuilds the group dicts on load; share them again.
        self.param_groups = self.base_optimizer.param_groups
        self.generator.set_state(extra["generator_state"].cpu())
        self._buffers = None
        self._perturbed = False
        self._draws_done = 0

    def _run_closure(self, closure: Callable[..., torch.Tensor]) -> torch.Tensor:
        self.zero_grad()
        total = None
        for draw in range(self.n_pert):
            last = draw == self.n_pert - 1
            self.perturb()
            try:
                with torch.enable_grad():
                    loss = closure(all_reduce=last, report=self.n_pert if last else 0).detach()
            finally:
                self.restore()
            total = loss if total is None else total + loss
        return total / self.n_pert

    def _single_device(self) -> torch.device:
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) != 1:
            raise ValueError(f"fSGLD needs all parameters on one device (its generator lives there), "
                             f"got {sorted(str(d) for d in devices)}")
        return devices.pop()

    def _get_buffers(self) -> "_Buffers":
        if self._buffers is None:
            self._buffers = _Buffers([p for group in self.param_groups for p in group["params"]
                                      if p.requires_grad])
        return self._buffers


class _Buffers:
    """Reusable parameter-sized storage: exact copies, and one flat noise tensor per dtype.

    A flat noise tensor lets one normal_() call fill the noise of every parameter of that dtype;
    `noise` holds its per-parameter views, in parameter order.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.saved = [torch.empty_like(p) for p in params]
        self.flat: list[torch.Tensor] = []
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        self.noise_of: dict[torch.Tensor, torch.Tensor] = {}
        for dtype, group in by_dtype.items():
            flat = torch.empty(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
            offset = 0
            for p in group:
                self.noise_of[p] = flat[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
            self.flat.append(flat)
        self.noise = [self.noise_of[p] for p in params]

    def draw(self, generator: torch.Generator) -> None:
        """Fill every noise view with fresh N(0, 1) samples."""
        for flat in self.flat:
            flat.normal_(0.0, 1.0, generator=generator)
