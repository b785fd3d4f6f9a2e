"""Option values parsed and checked without TensorFlow, so a typo is answered at once."""

from __future__ import annotations

from graftkit.errors import UsageError


def number_or_auto(value, name: str) -> float | str:
    if str(value) == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number or 'auto' (got {value!r})") from None


def parse_unfreeze(unfreeze) -> int | str:
    if str(unfreeze) in ("all", "auto"):
        return str(unfreeze)
    try:
        n = int(unfreeze)
    except ValueError:
        raise UsageError(f"--unfreeze must be auto, all or a number of blocks (got {unfreeze!r})"
                         ) from None
    if n < 1:
        raise UsageError(f"--unfreeze must be auto, all or at least 1 (got {n})")
    return n


def parse_unfreeze_schedule(value: str | None) -> tuple[int, ...]:
    """``none``/``""``: every block at once; ``gradual``: one more block per epoch (ULMFiT);
    ``0,1,3``: the epochs (from 0) at which blocks start, counting down from the top."""
    if value in (None, "", "none"):
        return ()
    if value == "gradual":
        return tuple(range(64))
    try:
        epochs = tuple(int(e) for e in str(value).split(","))
    except ValueError:
        raise ValueError("--unfreeze-schedule must be none, gradual or epochs like 0,1,3 "
                         f"(got {value!r})") from None
    if any(e < 0 for e in epochs) or list(epochs) != sorted(epochs):
        raise ValueError(f"--unfreeze-schedule epochs must be 0 or more and not decrease "
                         f"(got {value!r})")
    return epochs
