"""Exceptions for input that `ai/` refuses to analyse.

Each carries a message that says what is wrong and why, with the numbers, because the node
records `str(error)` as the job's failure reason. All derive from `InputVolumeError` (a
`ValueError`), so a caller can catch bad input without catching programming errors, and each
has a stable machine-readable `code` for the index and the status page. Two families:
`InvalidVolume` (the array or its geometry is broken: fix the export or the series) and
the content checks (`NoLungsFound`, `LungsCutOff`: the series is not a whole chest CT).
"""

from __future__ import annotations


class InputVolumeError(ValueError):
    """The volume cannot be analysed as a chest CT; the message says why."""

    code: str = "bad_input"


class InvalidVolume(InputVolumeError):
    """The array or its geometry is malformed, whatever it shows."""

    code = "invalid_volume"


class NotAVolume(InvalidVolume):
    """The array is not a 3D (z, y, x) volume of a usable size, or spacing is malformed."""

    code = "not_a_volume"


class NonFiniteVoxels(InvalidVolume):
    """The volume holds NaN or infinite values (broken rescale or decoding)."""

    code = "non_finite_voxels"


class TooFewSlices(InvalidVolume):
    """Too few slices to segment or classify (a localizer, a partial series)."""

    code = "too_few_slices"


class ImplausibleSpacing(InvalidVolume):
    """Voxel spacing outside what a CT can have (missing or corrupted geometry)."""

    code = "implausible_spacing"


class NoLungsFound(InputVolumeError):
    """No lungs in the volume (abdomen-only, head or extremity CT, or not in HU)."""

    code = "no_lungs_found"


class LungsCutOff(InputVolumeError):
    """The lungs are clipped by the field of view or the scan range, so volumes and ratios
    would be wrong."""

    code = "lungs_cut_off"
