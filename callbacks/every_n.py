"""A counter of validations shared by callbacks that act only at every n-th one."""

from __future__ import annotations

import lightning as L


class EveryNValidations:
    """Counts finished validations (not the sanity check) and says whether this one is an n-th.

    The count is part of the owning callback's state, so a resumed run keeps the same rhythm.

    Args:
        n: Act at every n-th validation (values below 1 count as 1).
    """

    def __init__(self, n: int = 1) -> None:
        self.n = max(1, n)
        self.count = 0

    def due(self, trainer: L.Trainer) -> bool:
        """Count this validation; True when the callback should act on it."""
        if trainer.sanity_checking:
            return False
        self.count += 1
        return self.count % self.n == 0
