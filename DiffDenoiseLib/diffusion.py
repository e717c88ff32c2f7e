"""Diffusion process: noise schedule, training loss, deterministic DDIM and symmetric SRDS sampling.

The samplers take any model called as `model(x_t, t, cond)` with x_t (B, 1, H, W),
t (B,) long and cond (B, C, H, W); the model knows nothing about the schedule.
Names follow Ho et al. (DDPM), Song et al. (DDIM), Nichol & Dhariwal (cosine schedule)
and Salimans & Ho (v-prediction).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

PREDICTIONS = ("eps", "v", "x0")


class NoiseSchedule:
    """Variance schedule of the forward process; `betas` and `alphas_cumprod` are float64 on the CPU."""

    def __init__(self, timesteps: int = 1000, kind: str = "cosine"):
        if timesteps < 2:
            raise ValueError("a noise schedule needs at least 2 timesteps")
        if kind == "cosine":
            s = 0.008
            steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        elif kind == "linear":
            scale = 1000.0 / timesteps  # keeps alphas_cumprod[T-1] near 0 for any T
            betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown noise schedule '{kind}': use cosine or linear")
        self.timesteps, self.kind = timesteps, kind
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) shaped (B, 1, 1, 1) on `like`'s device and dtype."""
        abar = self.alphas_cumprod[t.long().cpu()].view(-1, *([1] * (like.dim() - 1)))
        abar = abar.to(like.dtype).to(like.device)  # cast on the CPU: MPS has no float64
        return abar.sqrt(), (1 - abar).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, sigma = self._coefficients(t, x0)
        return a * x0 + sigma * noise

    def model_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """What the network learns to output: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0."""
        _check_prediction(prediction)
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        a, sigma = self._coefficients(t, x0)
        return a * noise - sigma * x0

    def predict_start(self, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor,
                      prediction: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network output, inverting `model_target`."""
        _check_prediction(prediction)
        a, sigma = self._coefficients(t, x_t)
        if prediction == "eps":
            return (x_t - sigma * model_out) / a, model_out
        if prediction == "x0":
            return model_out, (x_t - a * model_out) / sigma
        return a * x_t - sigma * model_out, sigma * x_t + a * model_out


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction target '{prediction}': use eps, v or x0")


def _randn(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (so a seed gives the same numbers) then moved to `like`."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def diffusion_loss(model, x0: torch.Tensor, cond: torch.Tensor, schedule: NoiseSchedule,
                   prediction: str = "v", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDPM training loss: t uniform in [0, T), MSE between the model output and its target."""
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator, device=device).to(x0.device)
    noise = _randn(x0.shape, x0, generator)
    x_t = schedule.q_sample(x0, t, noise)
    return F.mse_loss(model(x_t, t, cond), schedule.model_target(x0, noise, t, prediction))


@torch.no_grad()
def ddim_sample(model, cond: torch.Tensor, x_start: torch.Tensor, schedule: NoiseSchedule, steps: int = 5,
                t_start: Optional[int] = None, prediction: str = "v") -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x_start at t_start (None: T - 1) down to 0; returns x0_hat.

    The `steps` timesteps are evenly spaced from t_start to 0; each step predicts x0 and
    eps and moves to the next timestep along the same eps, the last returns x0_hat.
    """
    t_start = schedule.timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < schedule.timesteps or steps < 1:
        raise ValueError(f"t_start must be in [0, {schedule.timesteps}) and steps at least 1")
    times = torch.linspace(t_start, 0, steps, dtype=torch.float64).round().long().unique_consecutive().tolist()

    def predict(x: torch.Tensor, t: int) -> Tuple[torch.Tensor, torch.Tensor]:
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return schedule.predict_start(x, t_batch, model(x, t_batch, cond), prediction)

    x = x_start
    for t, t_next in zip(times[:-1], times[1:]):
        x0_hat, eps_hat = predict(x, t)
        abar_next = schedule.alphas_cumprod[t_next].item()
        x = math.sqrt(abar_next) * x0_hat + math.sqrt(1 - abar_next) * eps_hat
    return predict(x, times[-1])[0]


@torch.no_grad()
def srds_sample(model, cond: torch.Tensor, schedule: NoiseSchedule, steps: int = 5, pairs: int = 1,
                t_start: Optional[int] = None, prediction: str = "v", generator: Optional[torch.Generator] = None,
                single: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stabilized Reverse Diffusion Sampling: average DDIM samples from +e and -e; returns (mean, uncertainty).

    The generated noise is to first order an odd function of the starting noise, so it
    cancels within a pair. A truncated start t_start uses x_t = sqrt(1 - abar_t) * (+-e)
    (the diffused quantity starting at 0); t_start=None starts from +-e at T - 1.
    uncertainty = mean over pairs of |x0(+e) - x0(-e)| / 2. `single` (ablation) returns
    one sample from +e_1 and a zero uncertainty.
    """
    if pairs < 1:
        raise ValueError("SRDS needs at least one pair")
    scale = 1.0 if t_start is None else math.sqrt(1 - schedule.alphas_cumprod[int(t_start)].item())
    shape = (cond.shape[0], 1) + tuple(cond.shape[2:])
    if single:
        sample = ddim_sample(model, cond, scale * _randn(shape, cond, generator), schedule, steps, t_start, prediction)
        return sample, torch.zeros_like(sample)
    total = torch.zeros(shape, device=cond.device, dtype=cond.dtype)
    spread = torch.zeros_like(total)
    both_cond = torch.cat([cond, cond], dim=0)
    for _ in range(pairs):
        e = scale * _randn(shape, cond, generator)
        plus, minus = ddim_sample(model, both_cond, torch.cat([e, -e], dim=0), schedule, steps, t_start,
                                  prediction).chunk(2, dim=0)
        total += plus + minus
        spread += (plus - minus).abs() / 2
    return total / (2 * pairs), spread / pairs
