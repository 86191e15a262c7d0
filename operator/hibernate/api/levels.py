"""The sleep ladder (design.md, "Sleep levels"): 0 Awake … 5 Stop.

A level is written as its integer or its name, case-insensitive, like llmux's `From<u8>`.
"""

from __future__ import annotations

import enum
from typing import Final


class InvalidSleepLevel(ValueError):
    """A sleep level that is neither 0-5 nor one of the names; the message lists the valid values."""

    def __init__(self, value: object) -> None:
        super().__init__(f"invalid sleep level {value!r}: valid values are {valid_values_text()}")
        self.value = value


class SleepLevel(enum.IntEnum):
    AWAKE = 0
    L1 = 1
    L2 = 2
    CUDA_SUSPEND = 3
    CHECKPOINT = 4
    STOP = 5

    @property
    def label(self) -> str:
        """The canonical name used in the API (`CudaSuspend`, not `CUDA_SUSPEND`)."""
        return _NAMES[self]

    @classmethod
    def parse(cls, value: object) -> SleepLevel:
        """Accept 0-5 (int or digit string) or a name in any case; refuse everything else."""
        if isinstance(value, SleepLevel):
            return value
        if isinstance(value, bool):  # bool is an int in Python; True is not a level
            raise InvalidSleepLevel(value)
        if isinstance(value, int):
            if 0 <= value <= 5:
                return cls(value)
            raise InvalidSleepLevel(value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit() and len(text) == 1 and 0 <= int(text) <= 5:
                return cls(int(text))
            found = _BY_NAME.get(text.lower())
            if found is not None:
                return found
        raise InvalidSleepLevel(value)

    @classmethod
    def parse_or_none(cls, value: object) -> SleepLevel | None:
        """Like parse, but None for a missing or unreadable value (a report not written yet)."""
        if value is None:
            return None
        try:
            return cls.parse(value)
        except InvalidSleepLevel:
            return None

    def __str__(self) -> str:
        return self.label


_NAMES: Final = {
    SleepLevel.AWAKE: "Awake",
    SleepLevel.L1: "L1",
    SleepLevel.L2: "L2",
    SleepLevel.CUDA_SUSPEND: "CudaSuspend",
    SleepLevel.CHECKPOINT: "Checkpoint",
    SleepLevel.STOP: "Stop",
}
_BY_NAME: Final = {name.lower(): level for level, name in _NAMES.items()}

LEVEL_NAMES: Final = tuple(_NAMES.values())
# The agent performs 1-4; Stop (5) is the operator's (scaling).
AGENT_LEVELS: Final = (SleepLevel.L1, SleepLevel.L2, SleepLevel.CUDA_SUSPEND, SleepLevel.CHECKPOINT)

# The schema pattern for the string form: a digit 0-5 or a name, any case (Go RE2 syntax,
# which the API server uses; `(?i:...)` keeps it case-insensitive without CEL).
STRING_PATTERN: Final = "^([0-5]|(?i:" + "|".join(n.lower() for n in LEVEL_NAMES) + "))$"


def valid_values_text() -> str:
    return "0-5 or " + ", ".join(LEVEL_NAMES) + " (names are case-insensitive)"
