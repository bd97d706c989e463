"""Which predictors run at a decode step: the offline set, then the online window.

Offline ("skewed distribution"): the layers that take the most exits with every predictor
on. Online ("contextual similarity"): once ``history`` exits are known, the layers
``e + offset`` for each of the last ``history`` exit layers e. The last layer never gets a
predictor (stopping there is not an early exit).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Schedule:
    num_layers: int
    offline_layers: tuple[int, ...]
    history: int = 5
    offsets: tuple[int, ...] = (-2, 0, 2)
    online: bool = True
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        bad = [layer for layer in self.offline_layers if not 0 <= layer < self.num_layers - 1]
        if bad:
            raise ValueError(f"offline layers {bad} are outside [0, {self.num_layers - 2}]")

    def active(self, recent_exits: list[int] | tuple[int, ...]) -> frozenset[int]:
        """The active predictor layers given the request's exit layers so far (newest last)."""
        if not self.online or len(recent_exits) < self.history:
            return frozenset(self.offline_layers)
        key = tuple(recent_exits[-self.history:])
        if key not in self._cache:
            self._cache[key] = frozenset(
                e + o for e in key for o in self.offsets if 0 <= e + o < self.num_layers - 1
            )
        return self._cache[key]

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "offline_layers": list(self.offline_layers),
                "history": self.history, "offsets": list(self.offsets), "online": self.online}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(int(d["num_layers"]), tuple(d["offline_layers"]), int(d["history"]),
                   tuple(d["offsets"]), bool(d["online"]))
