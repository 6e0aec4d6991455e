"""PLACEHOLDER (issue 5 replaces it): parse beacon.check.* / beacon.autoheal* labels.

The label parser calls `parse_check_labels`; it is pure and never raises.
"""

from __future__ import annotations

from collections.abc import Mapping

from beacon.registry.model import AutohealSpec, CheckSpec


def parse_check_labels(
    labels: Mapping[str, str],
) -> tuple[CheckSpec | None, AutohealSpec | None, list[str]]:
    """Return (check, autoheal, problems). Each problem names the label and why
    it was ignored; an invalid check label is reported and ignored, never raised."""
    return None, None, []
