"""A training run's settings: what `python -m train` was asked, saved in every checkpoint.

In the checkpoint they stay a plain dict (torch.load(weights_only=True) loads nothing else);
TrainingSettings checks that dict when a run is saved and when it is resumed, so that a misspelt
or missing setting is an error naming it, not a KeyError in the middle of an epoch.

A new setting is one line here (`name: type = default`) beside its argparse flag in
train/main.py, and, if a resumed run must keep it, its name in main.RECIPE_KEYS. A setting
whose absence would change what a resumed run does goes in without a default, with
checkpoint.FORMAT_VERSION raised: older checkpoints are then refused with the way out.
"""
from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path


class SettingsError(ValueError):
    """Settings that do not match the schema; the message names the setting."""


@dataclass
class TrainingSettings:
    # the recipe: a resumed run keeps these (train/main.py's RECIPE_KEYS)
    dataset: str
    recipe: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    flip: bool
    shift: int
    robust: float
    seed: int
    validation_size: int | float  # a count, or a fraction of the training set
    train_limit: int | None
    test_limit: int | None
    # how this process runs: a resume may change them
    data_dir: str
    test_batch_size: int
    device: str
    threads: int
    checkpoint_dir: str
    resume: bool
    start_over: bool
    stop_after_epoch: int | None
    prepare_data_only: bool
    summary: bool = False

    @classmethod
    def from_dict(cls, data: dict, source: str = "settings") -> TrainingSettings:
        if not isinstance(data, dict):
            raise SettingsError(f"{source}: not a dict of settings")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise SettingsError(f"{source}: unknown setting(s) {', '.join(unknown)}: add them to "
                                "train/settings.py's TrainingSettings")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING:
                    raise SettingsError(f"{source}: setting {f.name!r} is missing")
                continue
            value, kinds = data[f.name], _kinds(hints[f.name])
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise SettingsError(f"{source}: setting {f.name!r} = {value!r} is not a "
                                    f"{' or '.join(k.__name__ for k in kinds)}")
        return cls(**data)

    @classmethod
    def from_args(cls, args) -> TrainingSettings:
        """train/main.py's parsed flags (paths as strings: a checkpoint holds no Path objects)."""
        return cls.from_dict({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                             "python -m train's flags")

    def to_dict(self) -> dict:
        return asdict(self)


def _kinds(hint) -> tuple[type, ...]:
    """isinstance() classes for an annotation (int, int | None; a float setting takes an int)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(type(None) if o is None else (typing.get_origin(o) or o) for o in options)
    return kinds + (int,) if float in kinds else kinds
