"""The supervised oracle: Fast mode's own student, trained further on clean/noisy pairs (the upper bound).

It starts from the student of the model that denoises the image (same architecture, same
2.5D context) and fits it with MSE to the clean image, seen through the pipeline's own
normalisation and transform, so the benchmark runs it exactly as Fast mode. It learns
from the image's training regions only (slabs around other slices of the volume, or the
strips around a 2D image's test crop), with fresh noise of the test condition drawn at
every step: it sees the noise model exactly and never the test crop. Starting from the
student makes it what the student could reach with clean targets and the same budget;
the report states the steps.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from DiffDenoiseLib.pipeline import DenoisingModel, prepare_array

from benchmarks.suite import Case, Noise


def training_stacks(case: Case) -> List[np.ndarray]:
    """(D, H, W) clean regions in [0, 1] with the slice to denoise at D // 2."""
    return list(case.train_slabs) if case.train_slabs is not None else [r[None] for r in case.train]


def pair(stack: np.ndarray, noise: Noise, case: Case, context: int, model: DenoisingModel,
         rng: np.random.Generator):
    """(network input (2k+1, H, W), clean target (H, W)) of one noisy draw of `stack`, as the pipeline sees it."""
    centre = stack.shape[0] // 2
    clean = stack[centre - context:centre + context + 1]
    noisy = noise.apply(clean, rng)
    z, normalization, transform, _ = prepare_array(case.to_units(noisy), model.card.get("transform", {"name": "none"}))
    target = transform.forward(normalization.forward(case.to_units(clean[context])))
    return z, target


def train_oracle(model: DenoisingModel, case: Case, noise: Noise, steps: int, batch: int = 8, patch: int = 64,
                 lr: float = 3e-4, seed: int = 0) -> DenoisingModel:
    """A copy of `model` whose student has been trained `steps` more steps, supervised, on `case`'s training regions."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = model.config.context_slices
    stacks = training_stacks(case)
    if any(s.shape[0] < 2 * k + 1 for s in stacks):
        raise ValueError(f"the oracle of a model that sees {k} neighbouring slices on each side needs training "
                         f"slabs of {2 * k + 1} slices")
    patch = min([patch] + [min(s.shape[1:]) for s in stacks])
    weights = np.array([s[0].size for s in stacks], dtype=np.float64)
    net = copy.deepcopy(model.network("student")).cpu().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        inputs, targets = [], []
        for _ in range(batch):
            z, target = pair(stacks[int(rng.choice(len(stacks), p=weights / weights.sum()))], noise, case, k, model, rng)
            y, x = (int(rng.integers(0, s - patch + 1)) for s in target.shape)
            turns = int(rng.integers(0, 4))
            inputs.append(np.rot90(z[:, y:y + patch, x:x + patch], turns, axes=(1, 2)))
            targets.append(np.rot90(target[y:y + patch, x:x + patch], turns)[None])
        for group in optimizer.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))
        loss = F.mse_loss(net(torch.from_numpy(np.stack(inputs).astype(np.float32))),
                          torch.from_numpy(np.stack(targets).astype(np.float32)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return dataclasses.replace(model, student=net.eval())
