"""The DICOM node: receives, stores, assembles, analyses and exports chest CT series."""

from pydicom import config as _pydicom_config

__version__ = "0.1.0"

# pydicom checks every value it reads against its VR and, by default, warns and logs one
# that does not fit, quoting it: a birth date written "1950-03-07" or a sex "male" would
# reach the node's log at WARNING. The node checks the values it uses itself
# (`dicomnode.volume`, `dicomnode.outputs.prepare_sources`), without quoting them.
_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
