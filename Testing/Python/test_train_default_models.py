"""The default models' training script: what a card says after its student was trained further."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_default_models  # noqa: E402
from DiffDenoiseLib.imageio import Image  # noqa: E402
from train_default_models import SHIPPED, continued_stages, evaluate, train_command  # noqa: E402


def card_with_student(student: dict) -> dict:
    return {"training": {"stages": {"bsn": {"steps": 10, "seconds": 1.0, "final_loss": 0.1}, "student": student}}}


def test_a_student_trained_further_keeps_its_history_and_says_what_each_run_learned_from():
    first = card_with_student({"steps": 100, "seconds": 5.0, "final_loss": 0.2, "targets": "Full's image on 8 "
                               "slice(s) per volume: SRDS's result on 2 of 2 volume(s)"})
    more = card_with_student({"steps": 50, "seconds": 2.5, "final_loss": 0.1, "targets": "Full's image on 16 "
                              "slice(s) per volume: the correlated-noise filters guided by SRDS's result on 2 of 2 "
                              "volume(s)"})
    stages = continued_stages(first, more)
    assert stages["bsn"] == first["training"]["stages"]["bsn"]  # the other networks are as they were
    student = stages["student"]
    assert (student["steps"], student["seconds"], student["final_loss"]) == (150, 7.5, 0.1)
    assert student["history"] == (
        "100 steps (Full's image on 8 slice(s) per volume: SRDS's result on 2 of 2 volume(s)), then 50 more from "
        "that student on the same training images (Full's image on 16 slice(s) per volume: the correlated-noise "
        "filters guided by SRDS's result on 2 of 2 volume(s))")
    again = continued_stages(card_with_student(student), card_with_student({"steps": 10, "seconds": 1.0,
                                                                             "final_loss": 0.05}))
    assert again["student"]["history"].startswith(student["history"] + ", then 10 more")
    assert again["student"]["steps"] == 160


def test_the_training_command_trains_where_it_is_told_and_continues_the_shipped_student():
    fresh = train_command("ct-head-2.5d", ["a.nrrd", "b.nrrd"], Path("store"), Path("c.json"), "cpu", False)
    assert fresh[fresh.index("train") + 1:fresh.index("--name")] == ["a.nrrd", "b.nrrd"]
    assert fresh[fresh.index("--device") + 1] == "cpu" and "--from" not in fresh and "--stages" not in fresh
    further = train_command("ct-head-2.5d", ["a.nrrd"], Path("store"), Path("c.json"), "cuda:1", True)
    assert further[further.index("--device") + 1] == "cuda:1"
    assert further[further.index("--from") + 1] == str(SHIPPED / "ct-head-2.5d")
    assert further[further.index("--stages") + 1] == "student"


def test_the_cards_scores_are_measured_on_the_device_asked_for(monkeypatch):
    """Every slice the evaluation denoises goes to the device given (a GPU when training ran there)."""
    seen = []

    class Result:
        def __init__(self, array):
            self.image = Image(array=array)

    def spy(image, model, mode, t_start, device=None, **where):
        seen.append((mode, device))
        return Result(np.asarray(image.array))

    monkeypatch.setattr(train_default_models, "denoise_image", spy)
    clean = np.random.default_rng(0).random((20, 16, 16))
    model = type("Model", (), {"config": type("Config", (), {"context_slices": 0})()})()
    recipe = {"sources": [(Image(array=clean), [clean + 0.01])]}
    device = torch.device("cpu")
    scores = evaluate(model, recipe, 0, ("full", "fast"), device=device)
    assert set(scores) == {"noisy", "full", "fast"} and scores["full"]["psnr"] == scores["noisy"]["psnr"]
    assert seen and {d for _, d in seen} == {device} and {m for m, _ in seen} == {"full", "fast"}
