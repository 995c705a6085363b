"""Typed records of what training decided for each head. No torch here: `ovr info` reads them without it."""
from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import asdict, dataclass, field


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Calibration:
    kind: str = "none"  # platt | temperature | none: p = sigmoid(a * logit + b)
    a: float = 1.0
    b: float = 0.0


@dataclass
class HeadRecord:
    """What training decided for one head, beside its weights."""
    seed: int
    positives: int
    negatives: int
    pos_weight: float
    l2: float
    threshold: float  # on the raw sigmoid confidence: best F1 on held-out validation rows
    calibration: Calibration
    trained_with: list[str]  # the classes with examples in this head's training set (positives or negatives)
    solver: str = "lbfgs"  # lbfgs (exact, linear) | adam (mlp)
    iterations: int = 0
    grad_norm: float | None = None
    val_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)  # precision, recall, f1 at the threshold
    run: str = ""  # id of the train / add-class / refresh call that made it
    created: str = field(default_factory=now)
    trained_with_inferred: bool = False  # from a manifest older than trained_with (see store.py)
    l2_path: list = field(default_factory=list)  # [[strength, validation loss], ...]: what the choice was made on
    curve: list = field(default_factory=list)  # adam heads: [[epoch, train loss, validation loss], ...]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "HeadRecord":
        d = dict(d)
        d["calibration"] = Calibration(**d.get("calibration") or {})
        return cls(**d)
