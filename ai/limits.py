"""Bounds of AI settings that the node's config checks at load time too: importable
without torch, so that reading a config stays fast."""

MAX_WINDOW_OVERLAP = 0.75
"""Largest sliding-window overlap: above it the windows multiply (64 x at 0.75) for no
gain."""
