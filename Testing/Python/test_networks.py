"""Networks: exact blindness of the BSN, shapes for odd sizes, zero-initialised outputs, config round trip;
and device selection."""

import json

import numpy as np
import pytest
import torch

from DiffDenoiseLib import device as device_module
from DiffDenoiseLib.device import select_device
from DiffDenoiseLib.networks import (
    BlindSpotNet,
    ConditionalUNet,
    NetworkConfig,
    StudentNet,
    count_parameters,
    dihedral_mean,
)

H, W = 23, 19  # odd sizes, so the pixel-shuffle path pads and crops


def _bsn(k, radius):
    return BlindSpotNet(NetworkConfig(context_slices=k, blind_spot_radius=radius, bsn_width=8, bsn_depth=2))


def _square(p, radius):
    """Pixels of the (2r+1)^2 square around p that lie inside the image."""
    return [(y, x) for y in range(max(p[0] - radius, 0), min(p[0] + radius + 1, H))
            for x in range(max(p[1] - radius, 0), min(p[1] + radius + 1, W))]


def _outside(p, radius):
    """A pixel just outside the square, in the image."""
    y = p[0] + radius + 1 if p[0] + radius + 1 < H else p[0] - radius - 1
    return y, p[1]


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("p", [(11, 9), (0, 0), (22, 17)], ids=["interior", "corner", "border"])
def test_blind_spot_hides_the_square_and_sees_the_rest(k, radius, p):
    net = _bsn(k, radius).eval()
    y = torch.rand(1, 2 * k + 1, H, W)
    with torch.no_grad():
        reference = net(y)[0, 0, p[0], p[1]]

        hidden = y.clone()
        for q in _square(p, radius):
            hidden[0, k, q[0], q[1]] += 5.0 * torch.randn(())
        assert abs(net(hidden)[0, 0, p[0], p[1]] - reference) < 1e-6

        seen = y.clone()
        seen[0, k][_outside(p, radius)] += 5.0
        assert abs(net(seen)[0, 0, p[0], p[1]] - reference) > 1e-5

        if k:
            neighbour = y.clone()
            neighbour[0, 0, p[0], p[1]] += 5.0
            assert abs(net(neighbour)[0, 0, p[0], p[1]] - reference) > 1e-5


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_blind_spot_gradient_is_exactly_zero_on_the_square(k, radius):
    net = _bsn(k, radius)
    for p in [(11, 9), (0, 0), (22, 17)]:
        y = torch.rand(1, 2 * k + 1, H, W, requires_grad=True)
        (grad,) = torch.autograd.grad(net(y)[0, 0, p[0], p[1]], y)
        centre = grad[0, k]
        assert all(centre[q] == 0 for q in _square(p, radius))
        assert centre[_outside(p, radius)] != 0
        if k:
            assert grad[0, k - 1, p[0], p[1]] != 0 and grad[0, k + 1, p[0], p[1]] != 0


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("size", [(37, 53), (1, 1), (2, 5)])
def test_shapes_for_any_size(k, size):
    cfg = NetworkConfig(context_slices=k, blind_spot_radius=1, bsn_width=8, bsn_depth=2, unet_base=8,
                        unet_mults=(1, 2, 2), student_width=8)
    y = torch.rand(2, 2 * k + 1, *size)
    cond = torch.rand(2, 1 + 2 * k, *size)
    x_t, t = torch.randn(2, 1, *size), torch.tensor([0, 999])
    assert BlindSpotNet(cfg)(y).shape == (2, 1) + size
    assert ConditionalUNet(cfg)(x_t, t, cond).shape == (2, 1) + size
    assert StudentNet(cfg)(y).shape == (2, 1) + size


@pytest.mark.parametrize("k", [0, 1])
def test_estimate_is_forward_for_a_one_pixel_blind_spot(k):
    net = _bsn(k, 0).eval()
    y = torch.rand(2, 2 * k + 1, H, W)
    with torch.no_grad():
        assert torch.equal(net.estimate(y), net(y))


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("radius", [1, 3])
def test_wide_blind_spot_estimate_is_repeatable_and_keeps_the_size(k, radius):
    """AP-BSN inference: a different function from the training geometry, the same for the same input
    (fixed-seed masks), and the input's size."""
    net = _bsn(k, radius).eval()
    y = torch.rand(1, 2 * k + 1, H, W)
    with torch.no_grad():
        first = net.estimate(y)
        assert first.shape == (1, 1, H, W) and torch.equal(first, net.estimate(y))
        assert (first - net(y)).abs().max() > 1e-5
        assert net.estimate(torch.rand(2, 2 * k + 1, 2, 5)).shape == (2, 1, 2, 5)


def test_wide_blind_spot_estimate_beats_the_training_geometry_on_correlated_noise_in_real_ct():
    """The shipped correlated-noise model on a real CT slice with noise blurred by 1.2 pixels:
    AP-BSN's inference keeps structure that the 4x4 shuffle of training loses."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from DiffDenoiseLib.imageio import read_image
    from DiffDenoiseLib.metrics import psnr
    from DiffDenoiseLib.noise import add_noise
    from DiffDenoiseLib.store import SHIPPED_DIR, load_model

    hu = read_image(get_testdata_file("CT_small.dcm")).array.reshape(128, 128).astype(np.float64)
    low, high = np.percentile(hu, [0.5, 99.5])
    clean = np.clip((hu - low) / (high - low), 0, 1)
    noisy = add_noise(clean, "correlated", 1.2, np.random.default_rng(3), sigma=0.1)
    net = load_model(SHIPPED_DIR / "correlated-noise-default").bsn
    assert net.config.blind_spot_radius == 3
    y = torch.from_numpy(noisy[None, None].astype(np.float32))
    with torch.no_grad():
        trained, estimate = (f(y)[0, 0].double().numpy() for f in (net, net.estimate))
    assert psnr(clean, estimate, data_range=1.0) > psnr(clean, trained, data_range=1.0) + 1.0


def test_untrained_unet_outputs_zero_and_student_returns_the_centre_slice():
    cfg = NetworkConfig(context_slices=1, unet_base=8, student_width=8)
    y = torch.rand(3, 3, 37, 53)
    out = ConditionalUNet(cfg)(torch.randn(3, 1, 37, 53), torch.tensor([1, 500, 999]), y)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(StudentNet(cfg)(y), y[:, 1:2])


def test_unet_output_depends_on_time_and_condition_once_trained():
    unet = ConditionalUNet(NetworkConfig(unet_base=8, unet_mults=(1, 2)))
    torch.nn.init.normal_(unet.body.conv_out.weight, std=0.1)
    x_t, cond = torch.randn(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    base = unet(x_t, torch.tensor([10]), cond)
    assert (unet(x_t, torch.tensor([900]), cond) - base).abs().max() > 1e-4
    assert (unet(x_t, torch.tensor([10]), cond + 1) - base).abs().max() > 1e-4


def test_default_blind_spot_network_size():
    assert 100_000 < count_parameters(BlindSpotNet(NetworkConfig())) < 250_000


def test_config_round_trip_and_unknown_keys():
    cfg = NetworkConfig(context_slices=2, blind_spot_radius=1, unet_mults=(1, 2))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["unet_mults"] == [1, 2]
    assert NetworkConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown network settings: bsn_widht"):
        NetworkConfig.from_dict({**data, "bsn_widht": 4})
    with pytest.raises(ValueError):
        NetworkConfig(context_slices=-1)


def test_select_device_cpu_and_auto_fallback(monkeypatch):
    device, message = select_device("cpu")
    assert device == torch.device("cpu") and "slow" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    device, message = select_device("auto")
    assert device.type == "cpu" and "no CUDA or MPS" in message and "Full mode" in message


def test_select_device_rejects_missing_or_unknown_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA was requested but torch reports no CUDA device; use --device cpu"):
        select_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("gpu0")


def test_self_ensemble_averages_the_views_turned_back():
    y = torch.rand(1, 3, 6, 10)
    double = lambda t: 2 * t  # noqa: E731
    assert dihedral_mean(double, 1) is double
    assert torch.allclose(dihedral_mean(double, 8)(y), 2 * y), "a view-independent function stays as it is"
    # a function that sees where it is (a ramp along the last axis): its mirror image averages the ramp away
    ramp = lambda t: t + torch.arange(t.shape[-1], dtype=t.dtype)  # noqa: E731
    assert torch.allclose(dihedral_mean(ramp, 2)(y), y + 4.5)
    assert torch.allclose(dihedral_mean(ramp, 4)(y), y + 4.5)
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        dihedral_mean(double, 3)


def test_self_ensemble_improves_the_shipped_ct_models_estimate_on_a_real_ct_slice():
    """Four flips and turns of pydicom's CT slice (Gaussian noise 25/255 of its range): the
    averaged blind-spot estimate beats one pass."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from DiffDenoiseLib.imageio import read_image
    from DiffDenoiseLib.metrics import psnr
    from DiffDenoiseLib.store import SHIPPED_DIR, load_model

    hu = read_image(get_testdata_file("CT_small.dcm")).array.reshape(128, 128).astype(np.float64)
    low, high = np.percentile(hu, [0.5, 99.5])
    clean = np.clip((hu - low) / (high - low), 0, 1)
    noisy = clean + np.random.default_rng(4).normal(0, 25 / 255, clean.shape)
    model = load_model(SHIPPED_DIR / "ct-head-default")
    assert model.sampling.self_ensemble == 4
    y = torch.from_numpy(noisy[None, None].astype(np.float32))
    with torch.no_grad():
        one, four = (model.blind_spot_estimate(v)(y)[0, 0].double().numpy() for v in (1, 4))
    gain = psnr(clean, four, data_range=1.0) - psnr(clean, one, data_range=1.0)
    assert gain > 0.1, gain
