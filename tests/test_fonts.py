"""Names in scripts DejaVu Sans lacks: drawn in an installed font that has them, else a
placeholder, never as empty boxes."""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from matplotlib import font_manager
from PIL import Image, ImageDraw

from ai.infer import Analysis
from dicomnode.outputs import fonts
from dicomnode.outputs.key_images import _draw_text, build_key_images
from dicomnode.outputs.pdf import build_pdf_report
from dicomnode.volume import CTVolume
from tests.test_key_images_pdf import PROVENANCE, _analysis, _volume_and_lungs

HAN = "王小明"
GLYPH_MISSING = r"Glyph \d+ .* missing from font"
"""matplotlib's warning for each character that no font it was given draws."""


def _solid_box_font(path: Path, characters: str) -> Path:
    """A TrueType font whose only glyphs are these characters, each a solid box."""
    names = [".notdef", *(f"uni{ord(c):04X}" for c in characters)]
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({ord(c): f"uni{ord(c):04X}" for c in characters})
    glyphs = {}
    for name in names:
        pen = TTGlyphPen(None)
        if name != ".notdef":
            for x, y in ((100, 0), (100, 700), (900, 700), (900, 0)):
                (pen.lineTo if x != 100 or y != 0 else pen.moveTo)((x, y))
            pen.closePath()
        glyphs[name] = pen.glyph()
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics({name: (1000, 100) for name in names})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "Test Han", "styleName": "Regular",
                            "psName": "TestHan-Regular"})
    builder.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800,
                     usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))
    return path


@pytest.fixture
def han_font(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host's fonts are DejaVu Sans and a font with the three Han characters."""
    path = _solid_box_font(tmp_path / "TestHan.ttf", HAN)
    font_manager.fontManager.addfont(str(path))  # matplotlib finds the family by name
    monkeypatch.setattr(fonts, "installed_fonts",
                        lambda: {fonts.base_font(): "DejaVu Sans", str(path): "Test Han"})
    return path


@pytest.fixture
def no_han_font(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fonts, "installed_fonts", lambda: {fonts.base_font(): "DejaVu Sans"})
    fonts._warn_no_font.cache_clear()


def test_text_dejavu_draws_is_one_run_in_dejavu(han_font: Path) -> None:
    assert fonts.font_runs("Müller, Jürgen Иванов") == [("Müller, Jürgen Иванов",
                                                         fonts.base_font())]
    assert fonts.drawable("Müller, Jürgen") == ("Müller, Jürgen", ["DejaVu Sans"])


def test_other_scripts_are_drawn_in_the_font_that_has_them(han_font: Path) -> None:
    assert fonts.font_runs("王, 小明") == [
        ("王", str(han_font)), (", ", fonts.base_font()), ("小明", str(han_font))]
    assert fonts.drawable("王, 小明") == ("王, 小明", ["DejaVu Sans", "Test Han"])


def _ink(text: str, size: int = 40) -> np.ndarray:
    image = Image.new("L", (8 * size, 2 * size), 0)
    _draw_text(ImageDraw.Draw(image), (0, 0), text, size, False, 255)  # type: ignore[arg-type]
    return np.asarray(image) > 127


def test_a_key_image_draws_the_glyphs_of_the_fallback_font(han_font: Path) -> None:
    """The test font's glyph is a solid box 0.8 x 0.7 em; DejaVu Sans would draw its
    hollow missing-glyph box instead."""
    ink = _ink("王")
    assert ink.sum() == pytest.approx(0.8 * 40 * 0.7 * 40, rel=0.15)
    assert not _ink("").any() and not _ink(" ").any()  # an empty line stays empty
    rows, columns = np.nonzero(ink)
    assert ink[rows.min():rows.max() + 1, columns.min():columns.max() + 1].all()


def _case(tmp: Path, name: str) -> tuple[CTVolume, Analysis]:
    """A scan without lesions whose patient name and study description are `name` and
    Han characters (UTF-8)."""
    volume, lung = _volume_and_lungs("normal", tmp)
    datasets = tuple(copy.deepcopy(ds) for ds in volume.datasets)
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
        ds.StudyDescription = "胸部 CT"
    return dataclasses.replace(volume, datasets=datasets), _analysis(volume, lung,
                                                                     np.zeros_like(lung))


def _pdf(volume: CTVolume, analysis: Analysis) -> bytes:
    ds = build_pdf_report(volume, analysis, PROVENANCE)
    return bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength]


def test_the_pdf_embeds_the_font_that_draws_the_name(han_font: Path, tmp_path: Path) -> None:
    volume, analysis = _case(tmp_path, "王^小明")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", GLYPH_MISSING)
        pdf = _pdf(volume, analysis)
        build_key_images(volume, analysis, PROVENANCE, 1)
    assert b"TestHan-Regular" in pdf


def test_without_a_font_a_placeholder_and_one_warning_without_the_name(
    no_han_font: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume, analysis = _case(tmp_path, "王^小明")
    assert fonts.drawable("王, 小明") == (fonts.PLACEHOLDER, ["DejaVu Sans"])
    assert fonts.font_runs("王, 小明") is None
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", GLYPH_MISSING)
        for _ in range(2):
            _pdf(volume, analysis)
            build_key_images(volume, analysis, PROVENANCE, 1)
    said = [r.getMessage() for r in caplog.records if r.name == fonts.__name__]
    assert len(said) == 1 and "fonts-noto-cjk" in said[0]
    assert not any(c in said[0] for c in HAN + "胸部")
    assert _ink(fonts.PLACEHOLDER).sum() == _ink("王").sum()  # the placeholder is drawn
