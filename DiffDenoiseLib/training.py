"""Training of the three stages on noisy images only (self-supervised).

1. BSN: the blind-spot network learns to predict each noisy slice from itself; it
   cannot see the pixel it predicts, so it cannot learn the identity.
2. Diffusion: the conditional UNet learns the distribution of the normalised residual
   r = (y - c) / s around the frozen BSN estimate c.
3. Student: a compact network is fitted to Full outputs (SRDS, then observation
   fusion when the model uses it; under correlated noise, the correlated-noise filters
   where Full's image gets them) on the training slices.

Every stage checkpoints atomically (at least every `checkpoint_seconds` and at its
end) and resumes from its last checkpoint. The random draws of step `i` depend only on
(seed, stage, i), so an interrupted and resumed run takes the same steps as one that
never stopped.
"""

from __future__ import annotations

import datetime
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from DiffDenoiseLib import __version__
from DiffDenoiseLib.atomic import replaced_when_done
from DiffDenoiseLib.diffusion import diffusion_loss
from DiffDenoiseLib.fusion import fuse_unless_correlated
from DiffDenoiseLib.imageio import Image
from DiffDenoiseLib.networks import NetworkConfig
from DiffDenoiseLib.noise import noise_variance_curve
from DiffDenoiseLib.normalization import HIGH_PERCENTILE, LOW_PERCENTILE
from DiffDenoiseLib.pipeline import (
    STAGES,
    DenoisingModel,
    SamplingConfig,
    correlated_filter_reach,
    correlated_noise_filters,
    correlated_noise_filters_apply,
    networks_reach,
    prepare_array,
    residual_scale,
    run_network_on_slices,
    sample_residual,
)
from DiffDenoiseLib.progress import CancelToken, Cancelled, Progress, ProgressTimer
from DiffDenoiseLib.settings import JsonSettings
from DiffDenoiseLib.slicing import as_slice_stack, choose_slice_axis, context_stack
from DiffDenoiseLib.wiener import reference_slices

__all__ = ["TrainConfig", "PatchSampler", "train_model", "Progress", "CancelToken", "Cancelled"]

CARD_FORMAT = "diffdenoise-model"
CARD_FORMAT_VERSION = 1


@dataclass
class TrainConfig(JsonSettings):
    """Optimisation settings; `max_steps` caps every stage (quick runs and tests)."""

    KIND = "training"

    stages: Tuple[str, ...] = STAGES
    max_steps: Optional[int] = None
    bsn_steps: int = 2000
    diffusion_steps: int = 4000
    student_steps: int = 1500
    batch_size: int = 16
    bsn_patch: int = 48
    diffusion_patch: int = 64
    student_patch: int = 64
    bsn_lr: float = 1e-3
    diffusion_lr: float = 5e-4
    student_lr: float = 1e-3
    student_slices: int = 48  # slices per volume that get SRDS targets for distillation
    # slices per volume the diffusion stage trains on (None: all); each needs a blind-spot estimate
    # first, and a wide blind spot's costs six network passes, the longest step of a CPU training
    diffusion_slices: Optional[int] = None
    seed: int = 0
    checkpoint_seconds: float = 60.0

    def steps_for(self, stage: str) -> int:
        steps = getattr(self, f"{stage}_steps")
        return min(steps, self.max_steps) if self.max_steps else steps


class PatchSampler:
    """Random 2.5D patches from one or many slice stacks, with flips and 90-degree turns.

    `volumes` are (n, H, W) arrays; `extras` are lists of arrays aligned with them (the
    BSN estimate, distillation targets) cut at the same place; `slice_indices` limit
    which slices are drawn. Volumes are drawn in proportion to their usable slices.
    """

    def __init__(self, volumes: Sequence[np.ndarray], context: int, patch: int,
                 extras: Sequence[Sequence[np.ndarray]] = (), slice_indices: Optional[Sequence[Sequence[int]]] = None):
        self.volumes = list(volumes)
        self.context = context
        self.extras = [list(e) for e in extras]
        self.patch = int(min([patch] + [min(v.shape[1:]) for v in self.volumes]))
        self.slice_indices = [list(s) for s in slice_indices] if slice_indices else [
            list(range(v.shape[0])) for v in self.volumes]
        counts = np.array([len(s) for s in self.slice_indices], dtype=np.float64)
        self.weights = counts / counts.sum()

    def batch(self, rng: np.random.Generator, size: int):
        """(stacks (B, 2k+1, P, P), [extra (B, 1, P, P) ...], volume index (B,)) as float32 tensors."""
        stacks, extras, which = [], [[] for _ in self.extras], []
        p = self.patch
        for _ in range(size):
            v = int(rng.choice(len(self.volumes), p=self.weights))
            i = int(rng.choice(self.slice_indices[v]))
            height, width = self.volumes[v].shape[1:]
            y0, x0 = int(rng.integers(0, height - p + 1)), int(rng.integers(0, width - p + 1))
            turns, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))

            def cut(a: np.ndarray) -> np.ndarray:
                a = np.rot90(a[..., y0:y0 + p, x0:x0 + p], turns, axes=(-2, -1))
                return a[..., ::-1] if flip else a

            stacks.append(cut(context_stack(self.volumes[v], i, self.context)))
            for out, extra in zip(extras, self.extras):
                out.append(cut(extra[v][i])[None])
            which.append(v)
        to_tensor = lambda arrays: torch.from_numpy(np.ascontiguousarray(np.stack(arrays), dtype=np.float32))
        return to_tensor(stacks), [to_tensor(e) for e in extras], torch.tensor(which)


@dataclass
class _StageRun:
    """What every stage loop needs besides its loss."""

    work_dir: Path
    device: torch.device
    config: TrainConfig
    progress: Optional[Callable[[Progress], None]]
    on_checkpoint: Optional[Callable[[str, int, Path], None]]
    cancel: CancelToken


def _checkpoint_path(work_dir: Path, stage: str) -> Path:
    return work_dir / f"{stage}.ckpt.pt"


def _run_stage(stage: str, net: torch.nn.Module, loss_fn, lr: float, run: _StageRun) -> Dict[str, float]:
    """Optimise `net` for the stage's steps; resume from its checkpoint; cancel after saving one."""
    total = run.config.steps_for(stage)
    path = _checkpoint_path(run.work_dir, stage)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    step, losses, seconds = 0, [], 0.0
    resumed = path.exists()
    if resumed:
        state = torch.load(path, map_location=run.device, weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
    started = time.monotonic() - seconds

    def summary() -> Dict[str, float]:
        return {"steps": total, "seconds": round(time.monotonic() - started, 1),
                "final_loss": float(np.mean(losses[-50:])) if losses else None}

    if step >= total:
        net.eval()
        return summary()
    net.train()

    def save() -> None:
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "losses": losses, "seconds": time.monotonic() - started}
        with replaced_when_done(path) as tmp:
            torch.save(state, tmp)
        if run.on_checkpoint is not None:
            run.on_checkpoint(stage, step, path)

    timer = ProgressTimer(total, step)
    if run.progress is not None:
        run.progress(Progress(stage, step, total, losses[-1] if losses else None, None, resumed=resumed))
    last_save = last_report = time.monotonic()
    stage_index = STAGES.index(stage)
    while step < total:
        if run.cancel.cancelled:
            save()
            raise Cancelled(f"training cancelled during the {stage} stage at step {step} of {total}")
        rng = np.random.default_rng([run.config.seed, stage_index, step])
        generator = torch.Generator(device=run.device).manual_seed(int(rng.integers(2 ** 62)))
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(lr, step, total)
        loss = loss_fn(rng, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(float(loss.item()))
        timer.advance()
        now = time.monotonic()
        if run.progress is not None and (now - last_report > 1.0 or step == total):
            recent = float(np.mean(losses[-50:]))
            run.progress(Progress(stage, step, total, recent, timer.eta_s()))
            last_report = now
        if now - last_save > run.config.checkpoint_seconds and step < total:
            save()
            last_save = now
    save()
    net.eval()
    return summary()


def _learning_rate(base: float, step: int, total: int) -> float:
    """Short warm-up, then cosine decay to a tenth: a function of the step alone, so resume needs no state."""
    warmup = max(1, min(100, total // 20))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _training_slices(images: Sequence[Image], transform: str):
    """Normalised, stabilised (n, H, W) slice stacks of every training image, and a privacy-free summary."""
    volumes, summary = [], []
    for image in images:
        z = prepare_array(image.array, {"name": transform}).z
        axis = choose_slice_axis(image.spacing, z.shape)
        volumes.append(np.ascontiguousarray(as_slice_stack(z, axis), dtype=np.float32))
        summary.append({"shape": list(image.array.shape), "spacing": [round(float(s), 4) for s in image.spacing],
                        "modality": image.modality, "slice_axis": int(axis)})
    return volumes, summary


def train_model(
    images: Sequence[Image],
    work_dir: Path,
    name: str,
    network_config: Optional[NetworkConfig] = None,
    train_config: Optional[TrainConfig] = None,
    transform: Optional[str] = None,
    sampling: Optional[SamplingConfig] = None,
    init_from: Optional[DenoisingModel] = None,
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[Progress], None]] = None,
    on_checkpoint: Optional[Callable[[str, int, Path], None]] = None,
    cancel: Optional[CancelToken] = None,
    log: Optional[Callable[[str], None]] = None,
) -> DenoisingModel:
    """Train (or adapt, with `init_from`) the requested stages on noisy images; resumable in `work_dir`."""
    if not images:
        raise ValueError("no training images were given")
    config = train_config or TrainConfig()
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    device = device or torch.device("cpu")
    cancel = cancel or CancelToken()
    log = log or (lambda message: None)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    if init_from is not None:
        inherited = init_from.card["transform"]["name"]
        if (network_config is not None and network_config != init_from.config) or transform not in (None, inherited):
            raise ValueError(f"a model adapted from '{init_from.card.get('name')}' keeps its architecture and noise "
                             "transform; leave out the network and noise settings, or train a new model")
        net_config, sampling, transform = init_from.config, init_from.sampling, inherited
    else:
        net_config, sampling = network_config or NetworkConfig(), sampling or SamplingConfig()
        transform = transform or "none"
    card = {
        "format": CARD_FORMAT, "format_version": CARD_FORMAT_VERSION, "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "architecture": net_config.to_dict(), "sampling": sampling.to_dict(), "transform": {"name": transform},
        "normalization": {"method": "linear", "low_percentile": LOW_PERCENTILE, "high_percentile": HIGH_PERCENTILE,
                          "per_image": True},
        "started_from": init_from.card.get("name") if init_from is not None else None,
        "library_version": __version__, "torch_version": torch.__version__, "metrics": {},
    }
    model = DenoisingModel.build(net_config, sampling, card, stages=STAGES)
    for stage in STAGES:
        if init_from is not None and getattr(init_from, stage) is not None:
            model.network(stage).load_state_dict(init_from.network(stage).state_dict())
        elif stage not in config.stages:
            setattr(model, stage, None)
    model.to(device)
    for stage in ("bsn", "diffusion"):
        if getattr(model, stage) is None and any(STAGES.index(s) > STAGES.index(stage) for s in config.stages):
            raise ValueError(f"training the later stages needs a trained {stage} stage: include '{stage}' in the "
                             "stages or start from a model that has it")

    volumes, summary = _training_slices(images, transform)
    run = _StageRun(work_dir, device, config, progress, on_checkpoint, cancel)
    k = net_config.context_slices
    report: Dict[str, dict] = {}

    if "bsn" in config.stages:
        sampler = PatchSampler(volumes, k, config.bsn_patch)
        bsn = model.bsn

        def bsn_loss(rng, generator):
            stacks, _, _ = sampler.batch(rng, config.batch_size)
            stacks = stacks.to(device)
            return F.mse_loss(bsn(stacks), stacks[:, k:k + 1])

        report["bsn"] = _run_stage("bsn", bsn, bsn_loss, config.bsn_lr, run)

    # the diffusion stage's slices of each volume and their blind-spot estimates (zeros elsewhere);
    # a student trained alone estimates only its own slices
    estimated = [evenly_spaced(v.shape[0], config.diffusion_slices) for v in volumes]
    estimates, scales = None, None
    if "diffusion" in config.stages:
        def estimate_volumes() -> List[np.ndarray]:
            full = [np.zeros_like(v) for v in volumes]
            for v, indices, out in zip(volumes, estimated, full):
                out[indices] = _estimate_slices(model, v, indices, device, cancel)
            return full

        estimates = _cached_per_volume(run.work_dir / "bsn_estimates.npz", len(volumes),
                                       "the blind-spot estimate of the training images", log, estimate_volumes)
        scales = [residual_scale(v[indices], c[indices]) for v, c, indices in zip(volumes, estimates, estimated)]
        scale_tensor = torch.tensor(scales, dtype=torch.float32)
        sampler = PatchSampler(volumes, k, config.diffusion_patch, extras=[estimates], slice_indices=estimated)
        unet, schedule = model.diffusion, model.schedule

        def diffusion_stage_loss(rng, generator):
            stacks, (c,), which = sampler.batch(rng, config.batch_size)
            stacks, c = stacks.to(device), c.to(device)
            x0 = (stacks[:, k:k + 1] - c) / scale_tensor[which].view(-1, 1, 1, 1).to(device)
            cond = torch.cat([c, stacks[:, :k], stacks[:, k + 1:]], dim=1)
            return diffusion_loss(unet, x0, cond, schedule, prediction=sampling.prediction, generator=generator)

        report["diffusion"] = _run_stage("diffusion", unet, diffusion_stage_loss, config.diffusion_lr, run)

    if "student" in config.stages:
        inherited = init_from is not None and init_from.student is not None
        indices, targets, kinds = _distillation_targets(model, volumes, estimated, estimates, scales, config, run, log,
                                                        inherited)
        sampler = PatchSampler(volumes, k, config.student_patch, extras=[targets], slice_indices=indices)
        student = model.student

        def student_loss(rng, generator):
            stacks, (target,), _ = sampler.batch(rng, config.batch_size)
            return F.l1_loss(student(stacks.to(device)), target.to(device))

        report["student"] = _run_stage("student", student, student_loss, config.student_lr, run)
        report["student"]["targets"] = _targets_described(indices, kinds)

    card["stages"] = model.stages()
    card["training_data"] = {"images": summary, "count": len(images)}
    card["training"] = {"config": config.to_dict(), "device": str(device), "machine": platform.machine(),
                        "stages": report}
    return model.eval()


def _cached_per_volume(path: Path, count: int, what: str, log, compute) -> List[np.ndarray]:
    """One array per training volume from `compute()`, kept in the work folder so a resumed training skips the pass.

    The work folder belongs to one training request (the CLI empties it when the
    settings change), and the pass runs only after the stages it depends on are done.
    """
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            if all(f"v{i}" in cached.files for i in range(count)):
                log(f"reusing {what} from {path.name}")
                return [cached[f"v{i}"] for i in range(count)]
        log(f"{path.name} lacks some of {what} (an earlier version wrote it): computing them again")
    else:
        log(f"computing {what}")
    arrays = compute()
    with replaced_when_done(path) as tmp:
        np.savez(tmp, **{f"v{i}": a for i, a in enumerate(arrays)})
    return arrays


def evenly_spaced(n: int, count: Optional[int]) -> np.ndarray:
    """`count` evenly spaced indices of range(n), ends included (all of them when count is None or >= n)."""
    count = n if count is None else min(n, count)
    return np.unique(np.linspace(0, n - 1, count).round().astype(int))


def _estimate_slices(model, volume: np.ndarray, indices: np.ndarray, device, cancel) -> np.ndarray:
    """The blind-spot estimate of `indices`' slices of `volume`: (len(indices), H, W)."""
    return run_network_on_slices(model.blind_spot_estimate(), volume, model.config.context_slices, device,
                                 cancel=cancel, indices=indices)[:, 0]


def _distillation_targets(model, volumes, estimated, estimates, scales, config, run, log, inherited_student=False):
    """Full-mode outputs on evenly spaced training slices (zeros elsewhere), cached for resume, and for each
    volume what made them (one of TARGET_KINDS: its noise decides), cached with them. A student trained further
    (`inherited_student`) sets the correlated-noise filters' gains, as in Full mode.

    The slices are chosen among the diffusion stage's (`estimated`), whose blind-spot
    estimates and residual `scales` they reuse. Without `estimates` (the student is trained
    alone) the estimate is computed on the chosen slices only, and the residual scale comes
    from them, as for a slice range in the pipeline.
    """
    per_volume = [indices[evenly_spaced(len(indices), config.student_slices)] for indices in estimated]
    settings = dict(context=model.config.context_slices, device=run.device, cancel=run.cancel)

    def srds(volume: np.ndarray, indices: Sequence[int], estimate: Optional[np.ndarray], scale: Optional[float]):
        if estimate is None:
            estimate = _estimate_slices(model, volume, indices, run.device, run.cancel)
            scale = residual_scale(volume[indices], estimate) if scale is None else scale
        denoised, _, _ = sample_residual(model, volume, estimate, None, None, -1, False, config.seed, settings,
                                         indices=indices, scale=scale)
        return denoised, scale

    def full_mode_outputs() -> List[np.ndarray]:
        targets, kinds = [], []
        for i, (volume, indices) in enumerate(zip(volumes, per_volume)):
            estimate, scale = (None, None) if estimates is None else (estimates[i][indices], scales[i])
            denoised, scale = srds(volume, indices, estimate, scale)
            full = np.zeros_like(volume)
            kind = 0  # an index of TARGET_KINDS
            if model.sampling.fusion:
                white = noise_variance_curve(volume)
                denoised, _, correlated = fuse_unless_correlated(volume[indices], denoised, white=white)
                kind = 0 if correlated else 1
                if correlated and correlated_noise_filters_apply(model, volume):
                    gains = inherited_student and model.config.context_slices > 0
                    denoised = _filtered_targets(model, volume, indices, denoised, white,
                                                 lambda near: srds(volume, near, None, scale)[0], run, gains)
                    kind = 3 if gains else 2
            full[indices] = denoised
            targets.append(full)
            kinds.append(kind)
        return targets + [np.array(kinds)]

    *targets, kinds = _cached_per_volume(run.work_dir / "student_targets.npz", len(volumes) + 1,
                                         "Full-mode distillation targets on the training slices", log,
                                         full_mode_outputs)
    return per_volume, targets, [TARGET_KINDS[int(i)] for i in kinds]


# What made a volume's distillation targets (Full's image), as the student's card records it
TARGET_KINDS = ("SRDS's result", "SRDS's result fused with the observation",
                "the correlated-noise filters guided by SRDS's result",
                "the correlated-noise filters, groups matched on SRDS's result, gains from the earlier student's")


def _targets_described(indices: Sequence[np.ndarray], kinds: Sequence[str]) -> str:
    """What the student learned from, for its card: a student trained further says which targets each run had."""
    counts = sorted({len(i) for i in indices})
    slices = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    made = "; ".join(f"{kind} on {kinds.count(kind)} of {len(kinds)} volume(s)" for kind in TARGET_KINDS
                     if kind in kinds)
    return f"Full's image on {slices} slice(s) per volume: {made}"


def _filtered_targets(model, volume: np.ndarray, indices: Sequence[int], denoised: np.ndarray, white,
                      srds_of: Callable[[List[int]], np.ndarray], run, student_gains: bool = False) -> np.ndarray:
    """Full's image of the slices `indices` of a volume whose noise looks correlated: the correlated-noise filters
    guided by SRDS's result `denoised` there, and, for a 2.5D model, on the slices either side of each that the
    filters read (`networks_reach`, as in a slice range of Full mode), whose result `srds_of` gives; with
    `student_gains` (a 2.5D model's student trained further) the Wiener gains come from that student's result as
    it was, as Full mode's do.

    SRDS's own result carries blobs of the correlated noise, which a student fitted to it can only imitate by
    passing the noise through; the filtered image does not. As a guide of Fast's Wiener filter, whose groups are
    matched on it, a student that passes noise through groups patches by their noise.
    """
    reach, margin, n = correlated_filter_reach(model.config), networks_reach(model.config), volume.shape[0]
    if not reach:
        return correlated_noise_filters(volume[indices], denoised, white, 0, range(len(indices)), device=run.device)
    pilots = dict(zip((int(i) for i in indices), denoised))
    near = [j for j in reference_slices(n, pilots, margin) if j not in pilots]
    if near:
        pilots.update(zip(near, srds_of(near)))
    gains = None
    if student_gains:
        needed = sorted(pilots)
        gains = dict(zip(needed, run_network_on_slices(model.network("student"), volume, model.config.context_slices,
                                                       run.device, cancel=run.cancel, indices=needed)[:, 0]))
    filtered = []
    for i in (int(i) for i in indices):
        run.cancel.raise_if_cancelled()
        lo, hi = max(0, i - margin), min(n, i + margin + 1)
        stack = np.stack([pilots[j] for j in range(lo, hi)])
        gains_from = None if gains is None else np.stack([gains[j] for j in range(lo, hi)])
        filtered.append(correlated_noise_filters(volume[lo:hi], stack, white, reach, [i - lo], device=run.device,
                                                 gains_from=gains_from)[0])
    return np.stack(filtered)
