"""The DICOM node: receives, stores, assembles, analyses and exports chest CT series."""

__version__ = "0.1.0"
