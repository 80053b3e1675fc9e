"""Pure compute on arrays: lung segmentation, the DeepSC network, inference and analysis.

Nothing here speaks DICOM networking or touches the database (see docs/architecture.md).
"""
