"""Settings dataclasses that round-trip strictly through JSON (model cards, `--config` files)."""

from __future__ import annotations

from dataclasses import asdict, fields


class JsonSettings:
    """Mixin for a settings dataclass: tuples become JSON lists and back; unknown keys are refused by name."""

    KIND = "model"  # the word used in error messages

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.KIND} settings: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
