"""The default models' training script: what a card says after its student was trained further."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from train_default_models import continued_stages  # noqa: E402


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
