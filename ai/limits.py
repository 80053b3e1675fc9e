"""Bounds and defaults of AI settings that the node's config needs at load time too:
importable without torch, so that reading a config stays fast."""

MAX_WINDOW_OVERLAP = 0.75
"""Largest sliding-window overlap: above it the windows multiply (64 x at 0.75) for no
gain."""

DEFAULT_OUTLINE_BAND_MM = 6.0
"""How far outside the network's lesions the outline is re-decided (`ai.refine`)."""
DEFAULT_OUTLINE_CONTRAST_HU = 30.0
"""HU above the local parenchyma from which a voxel there is lesion (`ai.refine`)."""
