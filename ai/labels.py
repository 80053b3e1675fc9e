"""Diagnostic classes of the DeepSC-COVID classifier, in logit order (paper section IV-C)."""

from enum import IntEnum


class Diagnosis(IntEnum):
    """Class index of each diagnosis; the order is the order of the model's logits."""

    COVID19 = 0
    CAP = 1
    NON_PNEUMONIA = 2


CLASS_NAMES: tuple[str, ...] = ("COVID-19", "CAP", "non-pneumonia")
"""Display names, indexed by `Diagnosis`."""
