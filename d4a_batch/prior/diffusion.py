"""Gaussian diffusion (DDPM) with improved-diffusion's schedules, attribute names and respacing.

Longer than 400 lines: one concern, the Gaussian diffusion process. About 310 of its
lines are the one class ``GaussianDiffusion`` (schedules, q/p moments, ε/v/x̂0 conversions,
sampling steps, training losses and the VLB), which mirrors improved-diffusion's class of
the same name method for method so the published weights and its respacing behave
identically; the schedule helpers and ``SpacedDiffusion`` around it are small. Splitting
the class would break that one-to-one reading against the reference.

The model predicts ε. Every schedule array is a float64 numpy array of length
``num_timesteps`` with the names of improved-diffusion's ``GaussianDiffusion``;
the per-sample values are gathered at float64 and cast to the data dtype.

Timesteps: methods take indices ``t[R]`` into *this* diffusion (0 = least noise).
The network always receives the diffusion's ``model_timesteps(t)``: the original
timestep ``timestep_map[t]`` (identity for the base process), times
``1000 / original_num_steps`` when ``rescale_timesteps`` -- so a network sees
the same inputs whether it runs under the base or a respaced process.

Reverse variance: ``learn_sigma`` -> learned interpolation between
``posterior_variance`` and ``beta`` (LEARNED_RANGE); otherwise ``beta`` (FIXED_LARGE,
improved-diffusion's default) or ``posterior_variance`` when ``sigma_small``.
Training loss: ε-MSE; with ``learn_sigma`` plus the VLB term on the variance
output only (improved-diffusion's hybrid loss, RESCALED_MSE: ``vb * T / 1000``).

Parameterisation: the network's (first C) output channels are ε (``"eps"``,
improved-diffusion and the published weights) or v = √ᾱ_t ε - √(1 - ᾱ_t) x_0
(``"v"``, Salimans & Ho 2022), trained with the v-MSE. Every consumer goes
through ``eps_and_xstart``, so samplers and DPS see ε and x̂_0 either way. Why v:
as ᾱ_t -> 0 an ε-network must get ε right to O(√ᾱ_t) for x̂_0 to be any good,
so an undertrained one leaves x̂_0 near 0 at the start of sampling; with
images whose sky sits at x = -1 that offset survives to the end as a haze
(measured on the first demo prior: corner x -0.38 instead of -1). A v-network
predicts -x_0 there, and its loss weights x_0 errors evenly over t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from d4a_batch.config import PriorConfig

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PARAMETERIZATIONS = ("eps", "v")


# --------------------------------------------------------------------------- schedules
def cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal's f(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008 (not divided by f(0))."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta), i = 0..T-1."""
    T = num_diffusion_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
        dtype=np.float64,
    )


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """β[T] (float64) of the "linear" (Ho et al., scaled to T) or "cosine" schedule."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar)
    raise ValueError(f"unknown beta schedule {schedule_name!r} (expected 'linear' or 'cosine')")


def shift_log_snr(betas: np.ndarray, shift: float) -> np.ndarray:
    """β[T] of the schedule whose log-SNR is the given one's plus ``shift`` at every t.

    ᾱ' = sigmoid(logit(ᾱ) + shift), β'_t = 1 − ᾱ'_t / ᾱ'_{t-1} ("simple diffusion"'s
    shifted schedule: +2 ln 2 for an image of half the size).
    """
    if shift == 0.0:
        return np.asarray(betas, dtype=np.float64)
    ac = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    logit = np.log(ac) - np.log1p(-ac) + shift
    ac_new = 1.0 / (1.0 + np.exp(-logit))
    return np.clip(1.0 - ac_new / np.append(1.0, ac_new[:-1]), 1e-12, 0.999)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Original timesteps kept when respacing, as improved-diffusion's ``respace.space_timesteps``.

    ``section_counts``: "ddimN" (DDIM's fixed integer stride, N steps), an int,
    a list of counts, or a string "10,15,20": the process is cut into equal
    sections and each is strided (fractionally) to its count.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, all_steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        all_steps += [start + round(k * frac_stride) for k in range(count)]
        start += size
    return set(all_steps)


# --------------------------------------------------------------------------- helpers
def _extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as [R, 1, ..., 1] in ``like``'s dtype and device (gathered at float64)."""
    out = torch.from_numpy(arr).to(t.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) of a Gaussian discretised to 256 bins on [-1, 1] (edge bins open), elementwise."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def _model_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


class _WrappedModel:
    """Calls ``model(x, model_timesteps(t))``: hands the network original (optionally rescaled) timesteps."""

    def __init__(self, model: Model, diffusion: GaussianDiffusion):
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.diffusion.model_timesteps(t))

    def parameters(self):
        params = getattr(self.model, "parameters", None)
        return params() if params is not None else iter(())


# --------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """DDPM forward/reverse process over ``betas[T]`` (ε-prediction).

    Attributes (float64 numpy, length T): betas, alphas_cumprod,
    alphas_cumprod_prev, alphas_cumprod_next, sqrt_alphas_cumprod,
    sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2.
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        *,
        learn_sigma: bool = False,
        sigma_small: bool = False,
        rescale_timesteps: bool = False,
        parameterization: str = "eps",
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
            )
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.rescale_timesteps = rescale_timesteps
        self.parameterization = parameterization
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        # the process whose timesteps the network was trained on (the base process)
        self.original_num_steps = self.num_timesteps
        self.timestep_map = np.arange(self.num_timesteps, dtype=np.int64)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log is clipped
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    def respace(self, section_counts: str | int | Sequence[int]) -> SpacedDiffusion:
        """This (base) process respaced to ``space_timesteps(num_timesteps, section_counts)``."""
        if self.original_num_steps != self.num_timesteps:
            raise ValueError("respace the base diffusion, not an already respaced one")
        return SpacedDiffusion(
            space_timesteps(self.num_timesteps, section_counts),
            self.betas,
            learn_sigma=self.learn_sigma,
            sigma_small=self.sigma_small,
            rescale_timesteps=self.rescale_timesteps,
            parameterization=self.parameterization,
        )

    # ----------------------------------------------------------------- network interface
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the network receives at indices t[R]: original timesteps (long), or rescaled floats."""
        orig = torch.from_numpy(self.timestep_map).to(t.device)[t]
        if self.rescale_timesteps:
            return orig.float() * (1000.0 / self.original_num_steps)
        return orig

    def wrap_model(self, model: Model) -> _WrappedModel:
        """``model`` called with this diffusion's ``model_timesteps(t)`` (wrapping is idempotent)."""
        if isinstance(model, _WrappedModel):
            if model.diffusion is self:
                return model
            model = model.model
        return _WrappedModel(model, self)

    # ----------------------------------------------------------------- forward process
    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I); x_start[R,...], t[R]."""
        if noise is None:
            noise = torch.randn(
                x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype
            )
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start {tuple(x_start.shape)}")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), broadcast to x_t."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        var = _extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """x̂_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t (Tweedie's estimate for an ε-model)."""
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def v_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t ε - √(1 - ᾱ_t) x_0, the target of a v-network."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def eps_and_xstart(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂_0) from the network's mean output ``output[R, C, N, N]`` at x_t, t.

        eps: identity and Tweedie's x̂_0; v: x̂_0 = √ᾱ x_t - √(1-ᾱ) v,
        ε̂ = √(1-ᾱ) x_t + √ᾱ v (exact, no division by a vanishing √ᾱ).
        """
        if self.parameterization == "eps":
            return output, self.predict_xstart_from_eps(x_t, t, output)
        sa = _extract(self.sqrt_alphas_cumprod, t, x_t)
        s1 = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return s1 * x_t + sa * output, sa * x_t - s1 * output

    # ----------------------------------------------------------------- reverse process
    def p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a network output [R, C or 2C, N, N] at x[R, C, N, N].

        Returns mean, variance, log_variance (broadcast to x), pred_xstart
        (clamped to [-1, 1] when ``clip_denoised``) and eps (ε̂, whatever the
        parameterisation).
        """
        C = x.shape[1]
        if self.learn_sigma:
            if model_output.shape != (x.shape[0], 2 * C, *x.shape[2:]):
                raise ValueError(
                    f"learn_sigma model output {tuple(model_output.shape)}, x {tuple(x.shape)}"
                )
            mean_out, var_values = model_output[:, :C], model_output[:, C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(np.log(self.betas), t, x)
            frac = (var_values + 1) / 2  # [-1, 1] -> [min_var, max_var]
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            if model_output.shape != x.shape:
                raise ValueError(f"model output {tuple(model_output.shape)} != x {tuple(x.shape)}")
            mean_out = model_output
            if self.sigma_small:
                log_var_arr = self.posterior_log_variance_clipped
            else:  # FIXED_LARGE: beta_t, with posterior_variance[1] at t = 0
                log_var_arr = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
            log_variance = _extract(log_var_arr, t, x).expand_as(x)
        eps, pred_xstart = self.eps_and_xstart(mean_out, x, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """Run the (wrapped) model at x[R,C,N,N], t[R] and return ``p_mean_variance_from_output``."""
        if t.shape != (x.shape[0],):
            raise ValueError(f"t shape {tuple(t.shape)} != [{x.shape[0]}]")
        out = self.wrap_model(model)(x, t)
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0): {"sample", "pred_xstart"}."""
        out = self.p_mean_variance(model, x, t, clip_denoised)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or ``noise``) down to x_0: [shape].

        ``generator`` (on the sampling device) makes the result reproducible;
        the device defaults to the model's.
        """
        if device is None:
            device = noise.device if noise is not None else _model_device(model)
        img = (
            noise
            if noise is not None
            else torch.randn(tuple(shape), generator=generator, device=device)
        )
        if tuple(img.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(img.shape)} != {tuple(shape)}")
        wrapped = self.wrap_model(model)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            img = self.p_sample(wrapped, img, t, clip_denoised, generator)["sample"]
        return img

    # ----------------------------------------------------------------- training
    def _vb_terms_bpd(
        self,
        out: dict[str, torch.Tensor],
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """VLB term per sample in bits/dim: decoder NLL at t = 0, else KL(q(x_{t-1}|x_t,x_0) || p)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        nll = -_mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        )
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses [R] at indices t[R]: {"loss", "mse"} (+ "vb" with learn_sigma).

        mse = mean over pixels of (target - output)², target ε or v (the
        parameterisation); with learn_sigma, vb is the VLB term
        through the variance output only (mean output detached), scaled by T/1000,
        and loss = mse + vb.
        """
        if t.shape != (x_start.shape[0],):
            raise ValueError(f"t shape {tuple(t.shape)} != [{x_start.shape[0]}]")
        if noise is None:
            noise = torch.randn(
                x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype
            )
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self.wrap_model(model)(x_t, t)
        C = x_start.shape[1]
        terms: dict[str, torch.Tensor] = {}
        if self.learn_sigma:
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            out = self.p_mean_variance_from_output(frozen, x_t, t, clip_denoised=False)
            terms["vb"] = self._vb_terms_bpd(out, x_start, x_t, t) * (self.num_timesteps / 1000.0)
        pred = model_output[:, :C]
        if pred.shape != noise.shape:
            raise ValueError(
                f"model output {tuple(model_output.shape)} for x {tuple(x_start.shape)}"
            )
        target = noise if self.parameterization == "eps" else self.v_target(x_start, t, noise)
        terms["mse"] = _mean_flat((target - pred) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only ``use_timesteps`` of a base process over ``betas``.

    Its betas reproduce the base ᾱ at the kept timesteps; ``timestep_map[i]`` is
    the original timestep handed to the network at spaced index i.
    """

    def __init__(self, use_timesteps: Iterable[int], betas: np.ndarray | Sequence[float], **kwargs):
        base = GaussianDiffusion(betas, **kwargs)
        self.use_timesteps = set(int(t) for t in use_timesteps)
        if not self.use_timesteps or not self.use_timesteps <= set(range(base.num_timesteps)):
            raise ValueError(
                f"use_timesteps must be a non-empty subset of 0..{base.num_timesteps - 1}"
            )
        kept = np.array(sorted(self.use_timesteps), dtype=np.int64)
        ac = base.alphas_cumprod[kept]
        new_betas = 1.0 - ac / np.append(1.0, ac[:-1])
        super().__init__(new_betas, **kwargs)
        self.timestep_map = kept
        self.original_num_steps = base.num_timesteps


def build_diffusion(
    cfg: PriorConfig, steps: str | int | Sequence[int] | None = None
) -> GaussianDiffusion:
    """The base diffusion of a prior config, or it respaced to ``steps`` (see space_timesteps)."""
    base = GaussianDiffusion(
        shift_log_snr(
            get_named_beta_schedule(cfg.noise_schedule, cfg.diffusion_steps), cfg.logsnr_shift
        ),
        learn_sigma=cfg.learn_sigma,
        sigma_small=cfg.sigma_small,
        rescale_timesteps=cfg.rescale_timesteps,
        parameterization=cfg.parameterization,
    )
    return base if steps is None else base.respace(steps)
