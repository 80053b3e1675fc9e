"""Fonts for the text that key images burn in and the PDF report draws.

Both draw in DejaVu Sans, which matplotlib ships, so the outputs look alike on every
host. It covers Latin, Greek and Cyrillic but not Chinese, Japanese or Korean: a patient
name in those scripts (the default character repertoire is not required of names, PS3.5
6.1) would come out as empty boxes. A text that DejaVu Sans cannot draw whole is drawn
in an installed font that can (Noto Sans CJK, WenQuanYi, Droid Sans Fallback: whatever
fonts the host has); when none can, the caller shows
`PLACEHOLDER`, and the node logs once what to install.
"""

from __future__ import annotations

import functools
import logging
import threading

from matplotlib import font_manager
from matplotlib.ft2font import FT2Font

logger = logging.getLogger(__name__)

BASE_FAMILY = "DejaVu Sans"
PLACEHOLDER = "[no font for this script]"
_NOT_FALLBACKS = ("Last Resort",)
"""Families that map every character to a "missing glyph" symbol: they draw nothing."""
_SCAN_LOCK = threading.Lock()


@functools.cache
def base_font(bold: bool = False) -> str:
    """The file of DejaVu Sans (bold or regular)."""
    properties = font_manager.FontProperties(family=BASE_FAMILY,
                                             weight="bold" if bold else "normal")
    return str(font_manager.findfont(properties, fallback_to_default=False))


@functools.cache
def installed_fonts() -> dict[str, str]:
    """Font file -> family, for every font on the host, regular upright ones first (a
    fallback draws names and descriptions, which are set in the regular weight).

    Fonts installed after matplotlib cached its font list are added to its font manager
    first: that cache is not refreshed by installing a font, and the PDF finds a
    fallback font by its family there."""
    manager = font_manager.fontManager
    with _SCAN_LOCK:  # workers' first reports may need a fallback at the same time
        known = {entry.fname for entry in manager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in known:
                try:
                    manager.addfont(path)
                except Exception:  # a file FreeType cannot read is no font
                    logger.debug("font file %s not readable", path)
        entries = sorted(
            (e for e in manager.ttflist if not e.name.startswith(_NOT_FALLBACKS)),
            key=lambda e: (abs(int(e.weight) - 400) if isinstance(e.weight, int) else 0,
                           e.style != "normal", e.name, e.fname),
        )
    return {e.fname: e.name for e in entries}


@functools.cache
def _characters(path: str) -> frozenset[int]:
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError):  # a file FreeType cannot read draws nothing
        return frozenset()


def font_runs(text: str, bold: bool = False) -> list[tuple[str, str]] | None:
    """`text` cut into runs that one font draws, each with its font file: DejaVu Sans
    wherever it has the character, else the first installed font that has it (spaces go
    with the run they are in). None, and a warning once, when a character has no font."""
    base = base_font(bold)
    runs: list[tuple[str, str]] = []
    for character in text:
        if character.isspace() and runs:
            path = runs[-1][1]
        elif ord(character) in _characters(base) or character.isspace():
            path = base
        else:
            found = next((f for f in installed_fonts() if ord(character) in _characters(f)), None)
            if found is None:
                _warn_no_font()
                return None
            path = found
        if runs and runs[-1][1] == path:
            runs[-1] = (runs[-1][0] + character, path)
        else:
            runs.append((character, path))
    return runs


def drawable(text: str) -> tuple[str, list[str]]:
    """What to draw for `text` with matplotlib, which falls back from font to font per
    character: the text and its font families in order (DejaVu Sans first), or
    PLACEHOLDER in DejaVu Sans when a character has no font."""
    runs = font_runs(text)
    if runs is None:
        return PLACEHOLDER, [BASE_FAMILY]
    families = dict.fromkeys([BASE_FAMILY] + [installed_fonts().get(path, BASE_FAMILY)
                                              for _, path in runs])
    return text, list(families)


@functools.cache
def _warn_no_font() -> None:
    """Once per process, and without the text: it is a patient's name or a description."""
    logger.warning(
        "a patient name or description is in a script that no installed font draws; key "
        "images and PDF reports show %r instead (install a font for that script, e.g. "
        "Debian's fonts-noto-cjk for Chinese, Japanese and Korean)", PLACEHOLDER)
