"""Diagnostic classes of the DeepSC-COVID classifier, in logit order (paper section IV-C)."""

from collections.abc import Sequence
from enum import IntEnum


class Diagnosis(IntEnum):
    """Class index of each diagnosis; the order is the order of the model's logits."""

    COVID19 = 0
    CAP = 1
    NON_PNEUMONIA = 2


CLASS_NAMES: tuple[str, ...] = ("COVID-19", "CAP", "non-pneumonia")
"""Display names, indexed by `Diagnosis`."""


def diagnosis_rule(disease_thresholds: Sequence[float] | None) -> str:
    """How `ai.infer.diagnose` calls a scan with these thresholds, in a few words for a
    report's reader: with thresholds, a disease may be called below the highest
    probability (the more probable disease when both reach theirs)."""
    if not disease_thresholds:
        return "most probable class"
    called = ", ".join(f"{CLASS_NAMES[d]} at P >= {100 * t:g} %" for d, t in zip(
        (Diagnosis.COVID19, Diagnosis.CAP), disease_thresholds, strict=True))
    return f"{called}, else non-pneumonia"
