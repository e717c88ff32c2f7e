"""Stage training: resume after interruption, cancel, card contents, patch sampling."""

import numpy as np
import pytest
import torch

from DiffDenoiseLib import training
from DiffDenoiseLib.imageio import Image
from DiffDenoiseLib.networks import NetworkConfig
from DiffDenoiseLib.noise import add_noise
from DiffDenoiseLib.pipeline import correlated_noise_filters, run_network_on_slices
from DiffDenoiseLib.training import (CancelToken, Cancelled, PatchSampler, TrainConfig, _cached_per_volume,
                                     _training_slices, train_model)

TINY = NetworkConfig(bsn_width=8, bsn_depth=2, unet_base=8, unet_mults=(1, 2), student_width=8)


def noisy_volume(seed=0, shape=(6, 40, 48)):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    clean = 100 + 50 * np.sin(x / 5.0) * np.cos(y / 7.0) + z
    return Image(array=(clean + rng.normal(0, 10, shape)).astype(np.float32),
                 spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()), modality="MR")


class StopAfterChecks(CancelToken):
    """Asks to stop after the training loop has looked `n` times (once per step)."""

    def __init__(self, n):
        super().__init__()
        self.remaining = n

    @property
    def cancelled(self):
        self.remaining -= 1
        return self.remaining < 0


def test_patch_sampler_cuts_aligned_patches_with_context():
    volume = np.arange(4 * 20 * 30, dtype=np.float32).reshape(4, 20, 30)
    sampler = PatchSampler([volume], context=1, patch=8, extras=[[volume * 2]])
    stacks, (extra,), which = sampler.batch(np.random.default_rng(0), 5)
    assert stacks.shape == (5, 3, 8, 8) and extra.shape == (5, 1, 8, 8)
    assert torch.equal(extra[:, 0], stacks[:, 1] * 2)
    assert which.tolist() == [0] * 5
    # neighbours are the adjacent slices (index difference = 20 * 30 voxels), never the centre itself
    assert torch.all((stacks[:, 0] - stacks[:, 1]).abs() == 600)


def test_resume_continues_from_the_saved_step_with_the_same_state(tmp_path):
    image = noisy_volume()
    config = TrainConfig(stages=("bsn",), bsn_steps=8, batch_size=4, bsn_patch=16, checkpoint_seconds=1e9)
    straight = train_model([image], tmp_path / "a", "a", network_config=TINY, train_config=config)

    with pytest.raises(Cancelled):
        train_model([image], tmp_path / "b", "b", network_config=TINY, train_config=config,
                    cancel=StopAfterChecks(3))
    saved = torch.load(tmp_path / "b" / "bsn.ckpt.pt", weights_only=True)
    assert saved["step"] == 3

    events = []
    resumed = train_model([image], tmp_path / "b", "b", network_config=TINY, train_config=config,
                          progress=events.append)
    assert events[0].resumed and events[0].stage == "bsn" and events[0].step == 3
    assert events[-1].step == 8
    for key, value in straight.bsn.state_dict().items():
        assert torch.allclose(value, resumed.bsn.state_dict()[key], atol=1e-6), key


def test_three_stages_give_a_complete_card(tmp_path):
    checkpoints = []
    model = train_model([noisy_volume(), noisy_volume(1, (3, 36, 36))], tmp_path, "tiny", network_config=TINY,
                        train_config=TrainConfig(max_steps=3, batch_size=2, bsn_patch=16, diffusion_patch=16,
                                                 student_patch=16, student_slices=2),
                        on_checkpoint=lambda stage, step, path: checkpoints.append((stage, step)))
    assert model.stages() == ["bsn", "diffusion", "student"]
    assert [c for c in checkpoints if c[1] == 3] == [("bsn", 3), ("diffusion", 3), ("student", 3)]
    card = model.card
    assert card["stages"] == ["bsn", "diffusion", "student"]
    assert card["training_data"]["count"] == 2
    assert card["training_data"]["images"][1]["shape"] == [3, 36, 36]
    assert card["architecture"]["bsn_width"] == 8
    assert card["training"]["stages"]["student"]["steps"] == 3


def test_later_stages_need_a_blind_spot_network(tmp_path):
    with pytest.raises(ValueError, match="bsn"):
        train_model([noisy_volume()], tmp_path, "x", network_config=TINY,
                    train_config=TrainConfig(stages=("diffusion",), max_steps=1))


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        train_model([noisy_volume()], tmp_path, "x", train_config=TrainConfig(stages=("bns",)))


def test_a_resumed_training_reuses_the_blind_spot_estimates_of_the_first_run(tmp_path):
    image = noisy_volume()
    config = TrainConfig(stages=("bsn", "diffusion"), max_steps=3, batch_size=2, bsn_patch=16, diffusion_patch=16,
                         checkpoint_seconds=1e9)
    first = []
    with pytest.raises(Cancelled):
        train_model([image], tmp_path, "x", network_config=TINY, train_config=config, cancel=StopAfterChecks(5),
                    log=first.append)
    assert "computing the blind-spot estimate of the training images" in first
    assert torch.load(tmp_path / "bsn.ckpt.pt", weights_only=True)["step"] == 3
    assert torch.load(tmp_path / "diffusion.ckpt.pt", weights_only=True)["step"] < 3

    second = []
    model = train_model([image], tmp_path, "x", network_config=TINY, train_config=config, log=second.append)
    assert second == ["reusing the blind-spot estimate of the training images from bsn_estimates.npz"]
    volumes, _ = _training_slices([image], "none")
    with np.load(tmp_path / "bsn_estimates.npz", allow_pickle=False) as cached:
        expected = run_network_on_slices(model.blind_spot_estimate(), volumes[0], 0, torch.device("cpu"))[:, 0]
        np.testing.assert_allclose(cached["v0"], expected, atol=1e-6)


def test_a_cache_an_earlier_version_wrote_without_an_entry_is_computed_again(tmp_path):
    """Distillation targets once were cached without what made them: a resumed training computes them again
    instead of failing on the missing entry, and then reuses the complete cache."""
    path, log, computed = tmp_path / "student_targets.npz", [], []
    np.savez(path, v0=np.ones((2, 3)))

    def compute():
        computed.append(True)
        return [np.zeros((2, 3)), np.array([2])]

    first = _cached_per_volume(path, 2, "the targets", log.append, compute)
    assert computed == [True] and first[1].tolist() == [2]
    assert log == ["student_targets.npz lacks some of the targets (an earlier version wrote it): computing them again"]
    again = _cached_per_volume(path, 2, "the targets", log.append, compute)
    assert computed == [True] and log[-1] == "reusing the targets from student_targets.npz"
    np.testing.assert_array_equal(again[0], np.zeros((2, 3)))


def test_diffusion_slices_limit_the_blind_spot_pass_and_the_student_picks_among_them(tmp_path):
    """With `diffusion_slices` only those evenly spaced slices get a blind-spot estimate (the
    rest stay zero and are never drawn), and the distillation slices are chosen among them."""
    image = noisy_volume(shape=(13, 40, 48))
    config = TrainConfig(max_steps=2, batch_size=2, bsn_patch=16, diffusion_patch=16, student_patch=16,
                         diffusion_slices=5, student_slices=3, checkpoint_seconds=1e9)
    model = train_model([image], tmp_path, "x", network_config=TINY, train_config=config)
    volumes, _ = _training_slices([image], "none")
    with np.load(tmp_path / "bsn_estimates.npz", allow_pickle=False) as cached:
        estimates = cached["v0"]
    assert [i for i in range(13) if np.any(estimates[i])] == [0, 3, 6, 9, 12]
    expected = run_network_on_slices(model.blind_spot_estimate(), volumes[0], 0, torch.device("cpu"), indices=[3, 9])[:, 0]
    np.testing.assert_allclose(estimates[[3, 9]], expected, atol=1e-6)
    with np.load(tmp_path / "student_targets.npz", allow_pickle=False) as cached:
        targets = cached["v0"]
    assert [i for i in range(13) if np.any(targets[i])] == [0, 6, 12]


def test_a_student_trained_alone_estimates_only_its_own_slices(tmp_path):
    """Adapting only the student skips the whole-volume blind-spot pass; the distillation targets
    are the Full-mode outputs of the chosen slices, and nothing elsewhere."""
    image = noisy_volume(shape=(10, 40, 48))
    base = train_model([image], tmp_path / "base", "base", network_config=TINY,
                       train_config=TrainConfig(stages=("bsn", "diffusion"), max_steps=2, batch_size=2, bsn_patch=16,
                                                diffusion_patch=16, checkpoint_seconds=1e9))
    log = []
    config = TrainConfig(stages=("student",), max_steps=2, batch_size=2, student_patch=16, student_slices=4,
                         checkpoint_seconds=1e9)
    student = train_model([image], tmp_path / "student", "student", train_config=config, init_from=base,
                          log=log.append)
    assert student.student is not None and not (tmp_path / "student" / "bsn_estimates.npz").exists()
    assert not any("blind-spot estimate" in line for line in log)
    with np.load(tmp_path / "student" / "student_targets.npz", allow_pickle=False) as cached:
        targets = cached["v0"]
    chosen = [i for i in range(10) if np.any(targets[i])]
    assert chosen == [0, 3, 6, 9]


@pytest.mark.parametrize("kind", ["correlated", "gaussian"])
def test_under_correlated_noise_the_student_learns_the_filtered_image(tmp_path, monkeypatch, kind):
    """A 2.5D model with a wide blind spot: under correlated noise each distillation target is the correlated-noise
    filters' image of its slice, guided by SRDS's result there and on the slices its Wiener step reads (Full's
    image: 4 either way, more than the networks' context of 1, and 4 beyond those, whose groups feed the slice
    too); under white noise the filters do not run and the target is
    the fused SRDS result."""
    z, y, x = np.mgrid[:9, :40, :48]
    clean = 0.5 + 0.3 * np.sin(x / 5.0) * np.cos(y / 7.0)
    noisy = add_noise(clean, kind, 1.5 if kind == "correlated" else 0.1, np.random.default_rng(1), sigma=0.1)
    image = Image(array=noisy.astype(np.float32), spacing=(1.0, 1.0, 1.0), modality="CT")
    network = NetworkConfig(bsn_width=8, bsn_depth=2, unet_base=8, unet_mults=(1, 2), student_width=8,
                            context_slices=1, blind_spot_radius=1)
    base = train_model([image], tmp_path / "base", "base", network_config=network,
                       train_config=TrainConfig(stages=("bsn", "diffusion"), max_steps=2, batch_size=2, bsn_patch=16,
                                                diffusion_patch=16, checkpoint_seconds=1e9))
    calls = []

    def spy(noisy_slices, pilots, white, context, indices, device=None, gains_from=None):
        assert gains_from is None  # no earlier student to take the gains from
        filtered = correlated_noise_filters(noisy_slices, pilots, white, context, indices, device=device)
        calls.append((noisy_slices.copy(), pilots.copy(), context, list(indices), filtered))
        return filtered

    monkeypatch.setattr(training, "correlated_noise_filters", spy)
    config = TrainConfig(stages=("student",), max_steps=2, batch_size=2, student_patch=16, student_slices=3,
                         checkpoint_seconds=1e9)
    student = train_model([image], tmp_path / "student", "student", train_config=config, init_from=base)
    volume = _training_slices([image], "none")[0][0]
    with np.load(tmp_path / "student" / "student_targets.npz", allow_pickle=False) as cached:
        targets = cached["v0"]
    assert [i for i in range(9) if np.any(targets[i])] == [0, 4, 8]
    made_by = "the correlated-noise filters guided by SRDS's result" if kind == "correlated" else (
        "SRDS's result fused with the observation")  # the card says what the student learned from
    assert student.card["training"]["stages"]["student"]["targets"] == (
        f"Full's image on 3 slice(s) per volume: {made_by} on 1 of 1 volume(s)")
    if kind == "gaussian":
        assert calls == []
        return
    # one filtering per target slice, of the slice and its neighbours within 8 (the whole volume here)
    assert [(len(noisy_slices), context, indices) for noisy_slices, _, context, indices, _ in calls] == [
        (9, 4, [0]), (9, 4, [4]), (9, 4, [8])]
    for (noisy_slices, pilots, _, _, filtered), lo, target in zip(calls, (0, 0, 0), (0, 4, 8)):
        np.testing.assert_array_equal(noisy_slices, volume[lo:lo + len(noisy_slices)])
        assert not np.array_equal(pilots, noisy_slices)
        np.testing.assert_allclose(targets[target], filtered[0], atol=1e-6)
    # the filters changed what SRDS gave: the target is not the pilot's centre slice
    assert not np.allclose(targets[4], calls[1][1][4], atol=1e-4)


def test_a_student_trained_further_sets_the_gains_of_its_correlated_noise_targets(tmp_path, monkeypatch):
    """As in Full mode, the Wiener gains of a 2.5D model's filtered targets come from the student's result: the
    student as it was before this training, on every slice the target's Wiener step reads; the card says so."""
    z, y, x = np.mgrid[:13, :40, :48]
    clean = 0.5 + 0.3 * np.sin(x / 5.0) * np.cos(y / 7.0)
    noisy = add_noise(clean, "correlated", 1.5, np.random.default_rng(2), sigma=0.1)
    image = Image(array=noisy.astype(np.float32), spacing=(1.0, 1.0, 1.0), modality="CT")
    network = NetworkConfig(bsn_width=8, bsn_depth=2, unet_base=8, unet_mults=(1, 2), student_width=8,
                            context_slices=1, blind_spot_radius=1)
    base = train_model([image], tmp_path / "base", "base", network_config=network,
                       train_config=TrainConfig(max_steps=2, batch_size=2, bsn_patch=16, diffusion_patch=16,
                                                student_patch=16, student_slices=2, checkpoint_seconds=1e9))
    volume = _training_slices([image], "none")[0][0]
    before = run_network_on_slices(base.student, volume, 1, torch.device("cpu"))[:, 0]
    gains = []

    def spy(noisy_slices, pilots, white, context, indices, device=None, gains_from=None):
        gains.append(gains_from)
        return correlated_noise_filters(noisy_slices, pilots, white, context, indices, device=device,
                                        gains_from=gains_from)

    monkeypatch.setattr(training, "correlated_noise_filters", spy)
    config = TrainConfig(stages=("student",), max_steps=2, batch_size=2, student_patch=16, student_slices=2,
                         checkpoint_seconds=1e9)
    student = train_model([image], tmp_path / "student", "student", train_config=config, init_from=base)
    assert len(gains) == 2  # the targets on slices 0 and 12, each filtered with the 8 slices its Wiener step reads
    np.testing.assert_allclose(gains[0], before[0:9], atol=1e-5)
    np.testing.assert_allclose(gains[1], before[4:13], atol=1e-5)
    assert "gains from the earlier student's on 1 of 1 volume(s)" in student.card["training"]["stages"]["student"][
        "targets"]
