"""The model store: save/load round trips, atomic replacement, refusals, forged weights, names and defaults."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from DiffDenoiseLib import store as store_module
from DiffDenoiseLib.imageio import Image
from DiffDenoiseLib.networks import NetworkConfig
from DiffDenoiseLib.store import ModelStore, load_model, model_for_correlated_noise, save_model, validate_name
from DiffDenoiseLib.training import TrainConfig, train_model

TINY = NetworkConfig(bsn_width=8, bsn_depth=2, unet_base=8, unet_mults=(1,), student_width=8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A real (barely trained) three-stage model with the card training writes."""
    noisy = np.random.default_rng(0).normal(100, 10, (3, 24, 20)).astype(np.float32)
    config = TrainConfig(max_steps=2, batch_size=2, bsn_patch=16, diffusion_patch=16, student_patch=16,
                         student_slices=1)
    return train_model([Image(array=noisy, modality="MR")], tmp_path_factory.mktemp("work"), "tiny",
                       network_config=TINY, train_config=config)


@pytest.fixture()
def saved(model, tmp_path):
    return save_model(model, tmp_path / "tiny")


class Forged:
    """Unpickling this object creates `marker`: what a malicious weight file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_keeps_card_and_weights(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["bsn.pt", "card.json", "diffusion.pt", "student.pt"]
    loaded = load_model(saved)
    assert loaded.card["name"] == "tiny" and loaded.card["stages"] == ["bsn", "diffusion", "student"]
    assert loaded.config == model.config and loaded.sampling == model.sampling
    for stage, state in model.state_dicts().items():
        again = loaded.state_dicts()[stage]
        assert state.keys() == again.keys()
        assert all(torch.equal(state[k].cpu(), again[k]) for k in state)
    x = torch.rand(1, 1, 20, 16)
    with torch.no_grad():
        assert torch.equal(model.bsn.eval()(x), loaded.bsn(x))


def test_a_partial_save_leaves_the_existing_model_untouched(model, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["tiny"], "no temporary folder is left behind"


def test_saving_again_replaces_the_model(model, saved):
    card = json.loads((saved / "card.json").read_text())
    model.card["description"] = "second version"
    try:
        save_model(model, saved)
    finally:
        del model.card["description"]
    assert json.loads((saved / "card.json").read_text())["description"] == "second version"
    assert "description" not in card
    assert [p.name for p in saved.parent.iterdir()] == ["tiny"]


def edit_card(folder, **changes):
    card = json.loads((folder / "card.json").read_text())
    card.update(changes)
    (folder / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "card.json").unlink(), "has no card.json"),
    (lambda f: (f / "card.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "card.json").write_text("[1, 2]"), "not a DiffDenoise model card"),
    (lambda f: edit_card(f, format="someone-elses-model"), "not a DiffDenoise model card"),
    (lambda f: edit_card(f, format_version=99), "card format version 99"),
    (lambda f: edit_card(f, stages=["bsn", "magic"]), "no valid stages"),
    (lambda f: (f / "diffusion.pt").unlink(), "missing its weight file diffusion.pt"),
    (lambda f: (f / "student.pt").write_bytes(b""), "student.pt was refused"),
    (lambda f: torch.save([1, 2, 3], f / "bsn.pt"), "does not hold a state_dict"),
    (lambda f: edit_card(f, architecture=dict(TINY.to_dict(), bsn_width=12)), "do not match the architecture"),
    (lambda f: shutil.rmtree(f), "no model folder"),
])
def test_a_damaged_model_is_refused_with_its_folder_and_problem_named(saved, damage, message):
    damage(saved)
    with pytest.raises(ValueError, match=message) as refused:
        load_model(saved)
    assert str(saved) in str(refused.value)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_forged_weight_file_is_refused_without_running_its_code(saved, tmp_path, writer):
    marker = tmp_path / "code-ran"
    forged = {"conv.weight": Forged(marker)}
    with open(saved / "bsn.pt", "wb") as handle:
        if writer == "pickle":
            pickle.dump(forged, handle, protocol=2)
        else:
            torch.save(forged, handle)
    with pytest.raises(ValueError, match="bsn.pt was refused"):
        load_model(saved)
    assert not marker.exists()
    # The forgery is real: unpickling it the unsafe way does run its code.
    with open(saved / "bsn.pt", "rb") as handle:
        if writer == "pickle":
            pickle.load(handle)
        else:
            torch.load(handle, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "../evil", "/abs", "sp ace", "ü"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid model name"):
        validate_name(name)


def test_safe_names_are_accepted():
    assert validate_name("ct-head_v1.2") == "ct-head_v1.2"


def shipped_copy(source, folder, name, default_for):
    target = folder / name
    shutil.copytree(source, target)
    edit_card(target, name=name, default_for=default_for)
    return target


@pytest.fixture()
def two_stores(saved, tmp_path):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    shipped_copy(saved, shipped, "ct-default", ["CT"])
    shipped_copy(saved, shipped, "mr-default", ["MR", "OT", "DX", None])
    shutil.copytree(saved, user / "mine")
    (user / ".training" / "unfinished").mkdir(parents=True)
    (user / "broken").mkdir()
    (user / "broken" / "card.json").write_text("{")
    return ModelStore(user, shipped_dir=shipped)


def test_list_names_every_model_with_its_source_and_flags_broken_ones(two_stores):
    entries = {e["name"]: e for e in two_stores.list()}
    assert sorted(entries) == ["broken", "ct-default", "mine", "mr-default"]
    assert entries["ct-default"]["source"] == "shipped" and entries["mine"]["source"] == "user"
    assert entries["mine"]["stages"] == ["bsn", "diffusion", "student"]
    assert entries["mine"]["path"] == str(two_stores.user_dir / "mine")
    assert "not valid JSON" in entries["broken"]["error"]


def test_resolve_by_name_or_path_and_unknown_names_list_the_available(two_stores, saved, tmp_path, monkeypatch):
    (tmp_path / "here" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert two_stores.resolve("mine") == two_stores.user_dir / "mine", "a store name wins over a local folder"
    assert two_stores.resolve("ct-default") == two_stores.shipped_dir / "ct-default"
    assert two_stores.resolve(str(saved)) == saved
    with pytest.raises(ValueError, match="unknown model 'nope'; available models: .*ct-default.*mine"):
        two_stores.resolve("nope")
    with pytest.raises(ValueError, match="no model folder"):
        two_stores.resolve(str(saved.parent / "missing"))


def test_a_user_model_named_like_a_shipped_one_takes_its_place(two_stores, saved):
    shutil.copytree(saved, two_stores.user_dir / "ct-default")
    assert two_stores.resolve(two_stores.default_for("CT")) == two_stores.user_dir / "ct-default"
    sources = sorted(e["source"] for e in two_stores.list() if e["name"] == "ct-default")
    assert sources == ["shipped", "user"]


@pytest.mark.parametrize("modality, expected", [
    ("CT", "ct-default"), ("MR", "mr-default"), ("DX", "mr-default"), (None, "mr-default"), ("PT", "mr-default"),
])
def test_default_for_picks_ct_for_ct_and_the_mr_model_for_everything_else(two_stores, modality, expected):
    assert two_stores.default_for(modality) == expected


def test_volumes_get_the_2_5d_default_and_single_images_the_2d_one(two_stores):
    folder = shipped_copy(two_stores.shipped_dir / "ct-default", two_stores.shipped_dir, "ct-2.5d", ["CT"])
    card = json.loads((folder / "card.json").read_text())
    card["architecture"]["context_slices"] = 2
    (folder / "card.json").write_text(json.dumps(card))
    assert two_stores.default_for("CT", slices=40) == "ct-2.5d"
    assert two_stores.default_for("CT", slices=3) == "ct-2.5d"
    assert two_stores.default_for("CT", slices=2) == "ct-default", "2 neighbours each side need 3 slices or more"
    assert two_stores.default_for("CT") == "ct-default"
    assert two_stores.default_for("MR", slices=40) == "mr-default"


def test_correlated_noise_gets_the_shipped_model_made_for_it_whatever_the_modality(two_stores):
    folder = shipped_copy(two_stores.shipped_dir / "ct-default", two_stores.shipped_dir, "correlated", [])
    edit_card(folder, default_for_noise="correlated")
    for modality, usual in (("CT", "ct-default"), ("MR", "mr-default"), (None, "mr-default")):
        assert two_stores.default_for(modality, correlated_noise=True) == "correlated"
        assert two_stores.default_for(modality, slices=40, correlated_noise=True) == "correlated"
        assert two_stores.default_for(modality) == usual, "white noise keeps the modality's default"
    volume_model = shipped_copy(two_stores.shipped_dir / "ct-default", two_stores.shipped_dir, "ct-2.5d", ["CT"])
    edit_card(volume_model, architecture=dict(json.loads((volume_model / "card.json").read_text())["architecture"],
                                              context_slices=2))
    assert two_stores.default_for("CT", slices=40, correlated_noise=True) == "ct-2.5d", \
        "neighbouring slices, whose noise is independent, beat a wider blind spot"
    assert two_stores.default_for("CT", slices=1, correlated_noise=True) == "correlated"
    assert two_stores.default_for("MR", slices=40, correlated_noise=True) == "correlated"
    wide_volume = shipped_copy(two_stores.shipped_dir / "ct-default", two_stores.shipped_dir, "correlated-2.5d", [])
    edit_card(wide_volume, default_for_noise="correlated",
              architecture=dict(json.loads((wide_volume / "card.json").read_text())["architecture"], context_slices=2))
    for modality in ("CT", "MR"):
        assert two_stores.default_for(modality, slices=40, correlated_noise=True) == "correlated-2.5d"
        assert two_stores.default_for(modality, slices=1, correlated_noise=True) == "correlated"


def test_without_a_model_for_correlated_noise_the_modality_default_serves(two_stores):
    assert two_stores.default_for("CT", correlated_noise=True) == "ct-default"


def test_the_model_for_correlated_noise_may_be_the_users_and_fits_the_image_or_is_none(two_stores):
    assert model_for_correlated_noise(two_stores.list(), 40) is None, "never the modality's default instead"
    edit_card(two_stores.user_dir / "mine", default_for_noise="correlated")
    assert model_for_correlated_noise(two_stores.list(), 1) == "mine"
    wide_volume = shipped_copy(two_stores.shipped_dir / "ct-default", two_stores.shipped_dir, "correlated-2.5d", [])
    edit_card(wide_volume, default_for_noise="correlated",
              architecture=dict(json.loads((wide_volume / "card.json").read_text())["architecture"], context_slices=2))
    assert model_for_correlated_noise(two_stores.list(), 40) == "correlated-2.5d"
    assert model_for_correlated_noise(two_stores.list(), 2) == "mine", "2 neighbours each side need 3 slices"


def test_default_for_without_shipped_models_says_so(saved, tmp_path):
    with pytest.raises(ValueError, match="no shipped default model for CT"):
        ModelStore(tmp_path / "user", shipped_dir=tmp_path / "none").default_for("CT")


def test_store_location_flag_then_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv(store_module.STORE_ENV, str(tmp_path / "env"))
    assert ModelStore().user_dir == tmp_path / "env"
    assert ModelStore(tmp_path / "flag").user_dir == tmp_path / "flag"
    monkeypatch.delenv(store_module.STORE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ModelStore().user_dir == tmp_path / "home" / ".diffdenoise" / "models"


def test_training_and_model_folders_live_in_the_user_store(tmp_path):
    store = ModelStore(tmp_path)
    assert store.training_dir("m1") == tmp_path / ".training" / "m1"
    assert store.model_dir("m1") == tmp_path / "m1"
    with pytest.raises(ValueError):
        store.model_dir("../m1")


@pytest.mark.parametrize("folder", sorted(p for p in ModelStore().shipped_dir.iterdir() if (p / "card.json").is_file()),
                         ids=lambda p: p.name)
def test_each_shipped_card_records_how_its_networks_were_trained(folder):
    """The card's training config covers every stage it ships and matches the steps each stage took; only a
    student trained further from where it was may have taken more, and its history says so."""
    card = json.loads((folder / "card.json").read_text())
    training = card["training"]
    assert set(training["config"]["stages"]) == set(card["stages"])
    for stage in card["stages"]:
        taken, asked = training["stages"][stage]["steps"], training["config"][f"{stage}_steps"]
        assert taken == asked or (stage == "student" and taken > asked and "then" in training["stages"][stage]["history"])
