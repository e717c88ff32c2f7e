"""Model folders and where they live.

A model is a folder: `card.json` (everything about the model, see `training.py`) and one
`<stage>.pt` file per trained stage holding that network's state_dict. Weights are read
with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so a model folder received from someone else cannot run code when loaded.

Models come from two places: the defaults shipped inside the package (read-only) and
the user's store (`--store`, else `$DIFFDENOISE_MODELS`, else `~/.diffdenoise/models`),
which also keeps interrupted trainings' checkpoints under `.training/<name>/`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from DiffDenoiseLib.atomic import replaced_when_done
from DiffDenoiseLib.pipeline import STAGES, DenoisingModel
from DiffDenoiseLib.training import CARD_FORMAT, CARD_FORMAT_VERSION

CARD_FILE = "card.json"
SHIPPED_DIR = Path(__file__).resolve().parent / "models"
STORE_ENV = "DIFFDENOISE_MODELS"
DEFAULT_STORE = Path("~/.diffdenoise/models")
TRAINING_DIR = ".training"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

PathLike = Union[str, os.PathLike]


def _is_name(text: str) -> bool:
    return bool(_NAME.fullmatch(text)) and text not in (".", "..")


def validate_name(name: str) -> str:
    """Return `name` if it is safe as a folder name (letters, digits, `-_.`); else raise ValueError."""
    if not _is_name(name):
        raise ValueError(f"invalid model name '{name}': use letters, digits, '-', '_' and '.' only "
                         "(no path separators, not '.' or '..')")
    return name


def weights_file(folder: Path, stage: str) -> Path:
    return folder / f"{stage}.pt"


def save_model(model: DenoisingModel, folder: PathLike) -> Path:
    """Write `model` to `folder`; an existing model there is replaced only once the new one is complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_card(tmp, dict(model.card, stages=model.stages()))
        for stage, state in model.state_dicts().items():
            torch.save({k: v.detach().cpu() for k, v in state.items()}, weights_file(tmp, stage))
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if old.exists():
                os.replace(old, folder)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def write_card(folder: PathLike, card: dict) -> None:
    """Write `card` as the model card of `folder`; the file appears only when complete (a card's scores can be
    rewritten in place, the weights as they are)."""
    with replaced_when_done(Path(folder) / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_card(folder: PathLike) -> dict:
    """The validated card of the model in `folder`; ValueError naming the folder and the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no model folder at {folder}")
    path = folder / CARD_FILE
    if not path.is_file():
        raise ValueError(f"{folder} is not a DiffDenoise model: it has no {CARD_FILE}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"the model card {path} is not valid JSON ({error})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path} is not a DiffDenoise model card")
    if card.get("format_version") != CARD_FORMAT_VERSION:
        raise ValueError(f"the model in {folder} has card format version {card.get('format_version')}; "
                         f"this version of DiffDenoise reads version {CARD_FORMAT_VERSION}")
    stages = card.get("stages")
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise ValueError(f"the model card {path} lists no valid stages (expected some of {', '.join(STAGES)})")
    for key in ("architecture", "sampling"):
        if not isinstance(card.get(key), dict):
            raise ValueError(f"the model card {path} has no '{key}' section")
    return card


def _load_weights(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"the model in {path.parent} is missing its weight file {path.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"the weight file {path} was refused: it is not a plain tensor file ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"the weight file {path} does not hold a state_dict of tensors")
    return state


def load_model(folder: PathLike, device: Optional[torch.device] = None) -> DenoisingModel:
    """Load and validate the model in `folder`; ValueError naming the folder and the problem."""
    folder = Path(folder)
    card = read_card(folder)
    states = {stage: _load_weights(weights_file(folder, stage)) for stage in card["stages"]}
    try:
        model = DenoisingModel.from_card(card, states)
    except (RuntimeError, ValueError, TypeError) as error:
        detail = " ".join(str(error).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise ValueError(f"the weights in {folder} do not match the architecture in its card: {detail}") from None
    return model.to(device) if device is not None else model


def default_model(cards: Iterable[dict], modality: Optional[str], slices: int = 1,
                  correlated_noise: bool = False) -> str:
    """Name of the default among the shipped models' `cards` (each with its `name`) for `modality` (the CT
    default for CT, the MR default otherwise).

    `slices` is how many slices the image has along its slice axis (1 for a 2D image).
    Among the defaults, the one with the most neighbouring-slice context the image can
    feed wins: a 2.5D model for volumes, a 2D model for single images. With
    `correlated_noise`, a shipped model whose card names it `default_for_noise:
    "correlated"` (a wider blind spot) comes first, whatever the modality, unless the
    modality's default sees more neighbouring slices: in-plane correlated noise is
    independent between slices, and on the Colin27 volume the 2.5D MR model's Full beat
    the 2D correlated-noise model's by 3.5 dB. A 2.5D correlated-noise model has both.
    """
    cards = list(cards)
    noise_matched = _deepest(cards, slices, _made_for_correlated_noise) if correlated_noise else None
    wanted = "CT" if modality == "CT" else "MR"
    chosen = (_deepest(cards, slices, lambda card: modality in (card.get("default_for") or []))
              or _deepest(cards, slices, lambda card: wanted in (card.get("default_for") or [])))
    if noise_matched and noise_matched[0] >= (chosen[0] if chosen else -1):
        chosen = noise_matched
    if not chosen:
        raise ValueError(f"no shipped default model for {modality or 'unknown-modality'} images is installed; "
                         "pass --model with a trained model")
    return chosen[1]


def model_for_correlated_noise(cards: Iterable[dict], slices: int = 1) -> Optional[str]:
    """Name of the model among `cards` made for spatially correlated noise (`default_for_noise: "correlated"`, a
    wider blind spot) that sees the most neighbouring slices an image of `slices` slices can feed, or None."""
    found = _deepest(list(cards), slices, _made_for_correlated_noise)
    return found[1] if found else None


def _made_for_correlated_noise(card: dict) -> bool:
    return card.get("default_for_noise") == "correlated"


def _deepest(cards: List[dict], slices: int, accepted: Callable[[dict], bool]) -> Optional[Tuple[int, str]]:
    """(context, name) of the `accepted` card that sees the most neighbouring slices an image of `slices` slices
    can feed (a context below `slices`), or None."""
    fitting = [(int((card.get("architecture") or {}).get("context_slices", 0)), card["name"]) for card in cards
               if accepted(card)]
    fitting = [entry for entry in fitting if entry[0] < slices]
    return max(fitting, key=lambda entry: entry[0]) if fitting else None


class ModelStore:
    """Shipped models (read-only, inside the package) and the user's models."""

    def __init__(self, store_dir: Optional[PathLike] = None, shipped_dir: Optional[PathLike] = None):
        chosen = store_dir or os.environ.get(STORE_ENV) or DEFAULT_STORE
        self.user_dir = Path(chosen).expanduser().absolute()
        self.shipped_dir = Path(shipped_dir if shipped_dir is not None else SHIPPED_DIR)

    def _folders(self):
        """(source, folder) of every model folder, shipped first; hidden folders are work areas."""
        for source, base in (("shipped", self.shipped_dir), ("user", self.user_dir)):
            if base.is_dir():
                for folder in sorted(base.iterdir()):
                    if folder.is_dir() and not folder.name.startswith(".") and (folder / CARD_FILE).is_file():
                        yield source, folder

    def list(self) -> List[dict]:
        """Every model's card with `name` (its folder), `source` and `path`; a broken one carries `error`."""
        entries = []
        for source, folder in self._folders():
            try:
                entry = dict(read_card(folder))
            except ValueError as error:
                entry = {"error": str(error)}
            entry.update(name=folder.name, source=source, path=str(folder))
            entries.append(entry)
        return entries

    def names(self) -> List[str]:
        return sorted({folder.name for _, folder in self._folders()})

    def resolve(self, name_or_path: PathLike) -> Path:
        """The folder of a model given by store name or by path; ValueError listing the names if unknown.

        A user model with the name of a shipped one takes its place: adapting a default to
        one's own scans under the same name makes it the default from then on.
        """
        text = str(name_or_path)
        is_path = os.sep in text or bool(os.altsep and os.altsep in text)
        if not is_path and _is_name(text):
            for folder in (self.user_dir / text, self.shipped_dir / text):
                if (folder / CARD_FILE).is_file():
                    return folder
        path = Path(text).expanduser()
        if path.is_dir():
            return path
        if is_path:
            raise ValueError(f"no model folder at {path}")
        validate_name(text)
        names = self.names()
        available = ", ".join(names) if names else f"none (the store {self.user_dir} is empty)"
        raise ValueError(f"unknown model '{text}'; available models: {available}")

    def default_for(self, modality: Optional[str], slices: int = 1, correlated_noise: bool = False) -> str:
        """Name of the shipped default for `modality`, an image of `slices` slices and its noise (`default_model`)."""
        cards = []
        for source, folder in self._folders():
            if source == "shipped":
                try:
                    cards.append(dict(read_card(folder), name=folder.name))
                except ValueError:
                    continue
        return default_model(cards, modality, slices, correlated_noise)

    def model_dir(self, name: str) -> Path:
        return self.user_dir / validate_name(name)

    def training_dir(self, name: str) -> Path:
        """Where `train` keeps the checkpoints of an unfinished training of `name`."""
        return self.user_dir / TRAINING_DIR / validate_name(name)
