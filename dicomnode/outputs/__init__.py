"""The node's results as DICOM objects: SEG, TID 1500 SR, key images, PDF.

Each builder takes the source CT headers (sorted as in the volume) and the analysis,
and returns a pydicom Dataset ready to store and send. What every object shares (who
made it, with which model) lives in `Provenance`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode import __version__

MANUFACTURER = "dicomnode"
MODEL_NAME = "DeepSC-COVID node"
RESEARCH_NOTICE = (
    "Research use: AI result not reviewed by a radiologist; not for diagnosis without review."
)


@dataclass(frozen=True)
class Provenance:
    """Who made an output: the node (device) and the model that produced the numbers."""

    device_uid: str
    """A UID for this node installation (SR observer device)."""
    model_name: str
    """E.g. "DeepSC-COVID lite"."""
    model_version: str
    """Identifies the weights: the first 12 hex digits of the checkpoint's sha256."""
    device_serial_number: str = "1"
    station_name: str = "DICOMNODE"
    job_key: str = ""
    """Names the job the outputs belong to; empty for an offline run (see `uid`)."""
    algorithm_parameters: dict[str, str] = field(default_factory=dict)
    """How the model ran and the analysis measured (device, test-time mirroring, lesion
    threshold, ...): the same weights give other numbers with other settings. The SEG's
    Algorithm Parameters (0066,0032), a comment in the SR and the PDF footer carry them."""

    def uid(self, *names: object) -> str:
        """The UID of one part of one output, e.g. `uid("seg", "instance")`.

        With a job key it is derived from the node, the job, the model version and the
        names, so a job run again after a crash remakes its outputs under the same UIDs:
        the node stores, and the PACS receives, each result once (other weights make other
        objects, under new UIDs). Without a job key it is new on every call.
        """
        if not self.job_key:
            return generate_uid()
        parts = [self.device_uid, self.job_key, self.model_version, *map(str, names)]
        return generate_uid(entropy_srcs=[json.dumps(parts)])

    @property
    def software_versions(self) -> list[str]:
        # A list, not a tuple: pydicom warns on tuples for multi-valued LO.
        return [f"dicomnode {__version__}", f"{self.model_name} {self.model_version}"]

    @property
    def algorithm_name(self) -> str:
        return self.model_name


def series_description(base: str, source: Dataset) -> str:
    """An output series' description naming the CT series it is about ("AI lesions
    (DeepSC) S3"): a chest CT study often holds a lung and a soft-tissue reconstruction,
    both analysed, and their results must not look alike in the series list."""
    number = source.get("SeriesNumber")
    return f"{base} S{number}" if number not in (None, "") else base
