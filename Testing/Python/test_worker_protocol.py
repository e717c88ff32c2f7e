"""The worker command lines the Slicer module runs: every panel setting reaches the command."""

from DiffDenoiseLib import worker_protocol
from DiffDenoiseLib.cli import build_parser

PYTHON = ["python"]


def test_denoise_command_carries_every_setting_and_parses():
    args = worker_protocol.denoise_command(PYTHON, "in.nrrd", "out.nrrd", "full", "mr-brain-default", "cpu", 4, 2,
                                           "u.nrrd", "stop", "y")
    parsed = build_parser().parse_args(args[args.index("denoise"):])
    assert (parsed.mode, parsed.model, parsed.device, parsed.steps, parsed.pairs) == (
        "full", "mr-brain-default", "cpu", 4, 2)
    assert (parsed.uncertainty, parsed.stop_file, parsed.slice_axis, parsed.json) == ("u.nrrd", "stop", "y", True)
    assert parsed.slices is None and parsed.rician_bias == "auto"
    preview = worker_protocol.denoise_command(PYTHON, "in.nrrd", "out.nrrd", slice_axis="z", slices="17",
                                              rician_bias="keep")
    parsed = build_parser().parse_args(preview[preview.index("denoise"):])
    assert (parsed.slices, parsed.rician_bias) == ((17, 18), "keep")


def test_train_command_sends_architecture_only_for_a_new_model():
    new = worker_protocol.train_command(PYTHON, ["a.nrrd"], "knee", ("bsn", "student"), "", 500, "cpu", "stop",
                                        "poisson", 1, 2)
    parsed = build_parser().parse_args(new[new.index("train"):])
    assert (parsed.noise, parsed.context_slices, parsed.blind_spot_radius) == ("poisson", 1, 2)
    assert (parsed.stages, parsed.max_steps, parsed.from_model) == ("bsn,student", 500, None)
    adapted = worker_protocol.train_command(PYTHON, ["a.nrrd"], "knee", from_model="ct-head-default",
                                            noise="poisson", context_slices=1)
    parsed = build_parser().parse_args(adapted[adapted.index("train"):])
    assert parsed.from_model == "ct-head-default"
    assert (parsed.noise, parsed.context_slices, parsed.blind_spot_radius) == (None, None, None)
