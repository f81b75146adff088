"""The privacy accountant of DP-SGD: Opacus' RDP or PRV accountant, with JSON state.

One step of DP-SGD is the Poisson-subsampled Gaussian mechanism with sampling rate q and
noise multiplier sigma; the accountant composes the steps and converts to (epsilon, delta)-DP
(RDP: Mironov 2017 and Mironov, Talwar & Zhang 2019; PRV: Gopi, Lee & Wutschitz 2021). Its
whole state is Opacus' ``history``, a list of (sigma, q, steps), so a checkpoint stores it
as JSON and a resumed run continues the exact composition.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_json

ACCOUNTANT_FILE = "privacy.json"
"""The accountant's state in a checkpoint folder."""


@functools.cache
def _opacus_accountants() -> dict[str, type]:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      mechanism: str = "rdp") -> float:
    """The smallest noise multiplier whose ``steps`` steps at ``sample_rate`` spend at most
    ``target_epsilon`` at ``delta`` (Opacus' binary search, to 0.01 in epsilon)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=mechanism))


class Accountant:
    """Composes DP-SGD steps; ``epsilon()`` is the privacy spent so far at ``delta``."""

    def __init__(self, mechanism: str, delta: float):
        if mechanism not in _opacus_accountants():
            raise ValueError(f"privacy.accountant must be one of {sorted(_opacus_accountants())}, got {mechanism!r}")
        self.mechanism = mechanism
        self.delta = delta
        self._acc = _opacus_accountants()[mechanism]()

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self._acc.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        if not self._acc.history:
            return 0.0
        return float(self._acc.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "delta": self.delta,
                "history": [[float(s), float(q), int(n)] for s, q, n in self._acc.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != self.mechanism:
            raise ValueError(f"the checkpoint's privacy accountant is {state.get('mechanism')!r}, this run's "
                             f"{self.mechanism!r}: set privacy.accountant={state.get('mechanism')} to resume")
        self._acc.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        atomic_write_json(Path(folder) / ACCOUNTANT_FILE, {**extra, "accountant": self.state_dict()})

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore from a checkpoint folder; returns the whole saved record."""
        path = Path(folder) / ACCOUNTANT_FILE
        if not path.is_file():
            raise ValueError(f"{folder} has no {ACCOUNTANT_FILE}: it was trained without privacy.enabled; "
                             "train the private run into a new --output")
        record = json.loads(path.read_text())
        self.load_state_dict(record["accountant"])
        return record
