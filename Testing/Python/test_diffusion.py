"""Diffusion: schedule, target round trips, DDIM exactness and determinism, SRDS pair symmetry,
and the SRDS variance reduction on a small trained model."""

import pytest
import torch
import torch.nn.functional as F

from DiffDenoiseLib.diffusion import NoiseSchedule, ddim_sample, diffusion_loss, srds_sample
from DiffDenoiseLib.networks import ConditionalUNet, NetworkConfig


def _random_unet(k=0):
    """A small UNet whose output is not zero (the untrained last convolution is)."""
    unet = ConditionalUNet(NetworkConfig(context_slices=k, unet_base=8, unet_mults=(1, 2))).eval()
    torch.nn.init.normal_(unet.body.conv_out.weight, std=0.1)
    return unet


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_decreases_inside_the_unit_interval(kind):
    schedule = NoiseSchedule(1000, kind)
    abar = schedule.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert (abar[1:] < abar[:-1]).all() and abar.min() > 0 and abar.max() < 1
    assert abar[0] > 0.999 and abar[-1] < 1e-3
    assert schedule.betas.max() <= 0.999
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule(1000, "quadratic")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_model_target_and_predict_start_round_trip(prediction):
    schedule = NoiseSchedule()
    x0, noise = torch.randn(6, 1, 5, 7, dtype=torch.float64), torch.randn(6, 1, 5, 7, dtype=torch.float64)
    t = torch.tensor([0, 1, 120, 500, 900, 999])
    x_t = schedule.q_sample(x0, t, noise)
    target = schedule.model_target(x0, noise, t, prediction)
    x0_hat, eps_hat = schedule.predict_start(x_t, t, target, prediction)
    assert torch.allclose(x0_hat, x0, atol=1e-8) and torch.allclose(eps_hat, noise, atol=1e-8)
    with pytest.raises(ValueError, match="unknown prediction target"):
        schedule.model_target(x0, noise, t, "score")


def test_diffusion_loss_is_mse_against_the_target():
    schedule = NoiseSchedule()
    x0, cond = torch.randn(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)
    zero = lambda x_t, t, c: torch.zeros_like(x_t)  # noqa: E731
    assert torch.isclose(diffusion_loss(zero, x0, cond, schedule, "x0"), x0.pow(2).mean())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    unet = _random_unet()
    first = diffusion_loss(unet, x0, cond, schedule, "v", g1)
    assert torch.equal(first, diffusion_loss(unet, x0, cond, schedule, "v", g2))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("t_start", [None, 120])
def test_ddim_recovers_a_point_mass_exactly(prediction, t_start):
    """For data concentrated at m the ideal model is known in closed form; DDIM must land on m."""
    schedule = NoiseSchedule()
    m = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    times = []

    def ideal(x_t, t, cond):
        times.append(int(t[0]))
        abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return schedule.model_target(m, (x_t - abar.sqrt() * m) / (1 - abar).sqrt(), t, prediction)

    x0 = ddim_sample(ideal, m, torch.randn_like(m), schedule, steps=5, t_start=t_start, prediction=prediction)
    assert torch.allclose(x0, m, atol=1e-6)
    assert times == ([999, 749, 500, 250, 0] if t_start is None else [120, 90, 60, 30, 0])


def test_ddim_is_deterministic_for_fixed_starting_noise():
    unet, schedule = _random_unet(k=1), NoiseSchedule()
    cond, x_start = torch.rand(2, 3, 13, 11), torch.randn(2, 1, 13, 11)
    first = ddim_sample(unet, cond, x_start, schedule, steps=4)
    assert torch.equal(first, ddim_sample(unet, cond, x_start.clone(), schedule, steps=4))
    assert (ddim_sample(unet, cond, -x_start, schedule, steps=4) - first).abs().max() > 1e-3


@pytest.mark.parametrize("t_start", [None, 120])
@pytest.mark.parametrize("pairs", [1, 2])
def test_srds_averages_plus_and_minus_the_same_noise(t_start, pairs):
    unet, schedule = _random_unet(), NoiseSchedule()
    cond = torch.rand(2, 1, 12, 10)
    mean, uncertainty = srds_sample(unet, cond, schedule, steps=3, pairs=pairs, t_start=t_start,
                                    generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    scale = 1.0 if t_start is None else (1 - schedule.alphas_cumprod[t_start]).sqrt().item()
    samples = []
    for _ in range(pairs):
        e = scale * torch.randn(2, 1, 12, 10, generator=g)
        samples.append(tuple(ddim_sample(unet, cond, s, schedule, 3, t_start) for s in (e, -e)))
    expected_mean = sum(p + m for p, m in samples) / (2 * pairs)
    expected_spread = sum((p - m).abs() / 2 for p, m in samples) / pairs
    assert torch.allclose(mean, expected_mean, atol=1e-5)
    assert torch.allclose(uncertainty, expected_spread, atol=1e-5)
    assert uncertainty.mean() > 1e-3


def test_srds_single_sample_uses_plus_e_only():
    unet, schedule = _random_unet(), NoiseSchedule()
    cond = torch.rand(1, 1, 9, 9)
    sample, uncertainty = srds_sample(unet, cond, schedule, steps=3, t_start=120, single=True,
                                      generator=torch.Generator().manual_seed(8))
    e = torch.randn(1, 1, 9, 9, generator=torch.Generator().manual_seed(8))
    e = (1 - schedule.alphas_cumprod[120]).sqrt().item() * e
    assert torch.allclose(sample, ddim_sample(unet, cond, e, schedule, 3, 120), atol=1e-6)
    assert torch.equal(uncertainty, torch.zeros_like(sample))


def _synthetic(n, generator, size=16, sigma=0.5):
    """cond: a smooth random field; data x0 = tanh(2 cond) + Gaussian noise. Returns (cond, signal, x0)."""
    cond = F.interpolate(torch.randn(n, 1, 4, 4, generator=generator), size=(size, size), mode="bilinear",
                         align_corners=False)
    signal = torch.tanh(2 * cond)
    return cond, signal, signal + sigma * torch.randn(n, 1, size, size, generator=generator)


def test_srds_pair_beats_two_independent_samples_on_a_trained_model():
    schedule, generator = NoiseSchedule(), torch.Generator().manual_seed(0)
    unet = ConditionalUNet(NetworkConfig(unet_base=16, unet_mults=(1, 2)))
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(300):
        cond, _, x0 = _synthetic(16, generator)
        loss = diffusion_loss(unet, x0, cond, schedule, "v", generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    cond, signal, _ = _synthetic(16, torch.Generator().manual_seed(123))
    pair_mse, independent_mse = 0.0, 0.0
    for seed in range(3):
        pair, _ = srds_sample(unet, cond, schedule, steps=5, generator=torch.Generator().manual_seed(seed))
        a, b = (srds_sample(unet, cond, schedule, steps=5, single=True,
                            generator=torch.Generator().manual_seed(offset + seed))[0] for offset in (10, 20))
        pair_mse += (pair - signal).pow(2).mean().item() / 3
        independent_mse += ((a + b) / 2 - signal).pow(2).mean().item() / 3
    assert pair_mse < 0.3 * independent_mse
    assert independent_mse < 0.5 * signal.pow(2).mean().item()  # the model did learn the signal
