"""Flatness and robustness measures of a trained network, model-agnostic.

Every measure works on a list of parameters and a `loss_fn() -> scalar tensor` closure (or, for
exposure bias, on a denoiser and a diffusion), so the closed-form tests can drive them with a
quadratic and the stages with the ADM UNet:

* `weights`      parameter snapshots (exact restore) and tensor-by-tensor vector algebra.
* `evalset`      the fixed (x0, t, eps) evaluation set shared by every model, and its loss.
* `lpf`          expected loss under Gaussian weight noise (Bisla et al. 2022).
* `perturbation` loss along random unit directions at given radii (Cha et al. 2021).
* `surface`      2-D loss surface along filter-normalised directions (Li et al. 2018).
* `hessian`      top eigenvalue (power iteration) and trace (Hutchinson) from Hessian-vector products.
* `exposure`     norm of the predicted noise per timestep, training inputs vs sampling chain.
* `model_setup`  build a UNet and diffusion from resolved settings and load a weights file.
"""
