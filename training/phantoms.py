"""Synthetic chest CT phantoms with ground truth, for tests, training and benchmarks.

No clinical data can be downloaded here, so the node trains and is tested on phantoms whose
lesion statistics follow the DeepSC paper's Findings 1-4 (docs/phantoms.md): COVID-19 has
more, larger, peripheral, scattered, bilateral ground-glass lesions; CAP has fewer, smaller,
central, unilateral lesions with a consolidated core. The anatomy (body wall, ribs, spine,
mediastinum, heart, great vessels, airways, vessel trees, diaphragm domes, abdomen, table)
is there so that a lung segmenter and a CNN have real work to do.

Everything is drawn analytically per slab of slices (float32, no per-voxel Python loops);
smooth random fields are coarse lattices interpolated with cubic B-spline weight matrices,
so one field can be sampled exactly on the full grid, a strided planning grid or a box.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ai.labels import CLASS_NAMES, Diagnosis

log = logging.getLogger(__name__)

HU_MIN = -1024
HU_MAX = 3071
"""Range stored with RescaleIntercept -1024 in 12 unsigned bits; the volume is clipped to it."""

MANUFACTURER = "dicomnode phantom"

AIR_HU = -1000.0
FAT_HU = -100.0
MEDIASTINAL_FAT_HU = -85.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
LIVER_HU = 60.0
SPLEEN_HU = 48.0
ESOPHAGUS_HU = 35.0
AIRWAY_WALL_HU = 25.0
CSF_HU = 15.0
RIB_HU = 650.0
CARTILAGE_HU = 140.0
CORTICAL_HU = 700.0
CANCELLOUS_HU = 230.0
DISC_HU = 80.0
LUNG_HU = -860.0
TABLE_HU = -150.0

_KIND_ALIASES: dict[str, Diagnosis] = {
    "covid": Diagnosis.COVID19,
    "covid19": Diagnosis.COVID19,
    "covid-19": Diagnosis.COVID19,
    "cap": Diagnosis.CAP,
    "normal": Diagnosis.NON_PNEUMONIA,
    "non-pneumonia": Diagnosis.NON_PNEUMONIA,
    "non_pneumonia": Diagnosis.NON_PNEUMONIA,
}
KIND_NAMES: dict[Diagnosis, str] = {
    Diagnosis.COVID19: "covid",
    Diagnosis.CAP: "cap",
    Diagnosis.NON_PNEUMONIA: "normal",
}
"""Short name of each class, as accepted by `generate_phantom` and the CLI."""

THICKNESSES_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
"""Reconstructed slice thicknesses scanners offer; one is drawn when none is given."""

_SLAB_VOXELS = 1 << 21
"""Voxels rendered per slab: small enough to stay in reused heap memory."""


def parse_kind(kind: Diagnosis | str) -> Diagnosis:
    """The class of `kind`: a `Diagnosis`, its index, or a name such as "covid", "cap",
    "normal" or "non-pneumonia"."""
    if isinstance(kind, Diagnosis):
        return kind
    if isinstance(kind, int):
        return Diagnosis(kind)
    try:
        return _KIND_ALIASES[str(kind).strip().lower()]
    except KeyError:
        choices = ", ".join(sorted(_KIND_ALIASES))
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {choices}") from None


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic CT with its ground truth. Arrays are (z, y, x); slice 0 is the most
    superior; rows run anterior to posterior, columns patient right to left."""

    volume_hu: np.ndarray
    """int16 Hounsfield units, clipped to [HU_MIN, HU_MAX]."""
    spacing_mm: tuple[float, float, float]
    """(dz, dy, dx): slice interval and pixel spacing."""
    lung_mask: np.ndarray
    """Lung parenchyma with its vessels and lesions; not the trachea or main bronchi."""
    lesion_mask: np.ndarray
    """Subset of `lung_mask`; empty for non-pneumonia."""
    label: Diagnosis
    seed: int
    slice_thickness_mm: float
    noise_sigma_hu: float
    patient_width_mm: float
    """Lateral body width."""
    kvp: int
    lesions_planned: int
    """Lesions placed, each drawn as its own connected component (one left without free
    lung near its centre would come out empty)."""

    @property
    def kind(self) -> str:
        return KIND_NAMES[self.label]

    @property
    def lvr(self) -> float:
        """Lesion volume ratio of the ground truth (paper Finding 2)."""
        lung = int(np.count_nonzero(self.lung_mask))
        return float(np.count_nonzero(self.lesion_mask)) / lung if lung else 0.0


# --------------------------------------------------------------------------- smooth fields


def _bspline_matrix(positions: np.ndarray, n_lattice: int) -> np.ndarray:
    """(len(positions), n_lattice) cubic B-spline weights; positions in [0, 1] span the
    lattice, whose ends are clamped."""
    t = np.asarray(positions, dtype=np.float64) * (n_lattice - 1)
    base = np.floor(t).astype(np.int64)
    f = t - base
    weights = (
        (1 - f) ** 3 / 6,
        (3 * f**3 - 6 * f**2 + 4) / 6,
        (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6,
        f**3 / 6,
    )
    out = np.zeros((t.size, n_lattice), dtype=np.float32)
    rows = np.arange(t.size)
    for offset, w in zip((-1, 0, 1, 2), weights, strict=True):
        np.add.at(out, (rows, np.clip(base + offset, 0, n_lattice - 1)), w)
    return out


_BSPLINE_GAIN = float(
    1.0 / np.sqrt(np.mean(np.sum(_bspline_matrix(np.linspace(0.0, 1.0, 257), 9) ** 2, axis=1)))
    ** 3
)
"""Rescales a B-spline interpolated N(0, 1) lattice to about unit standard deviation."""


class _Field:
    """A smooth 3D random field of about unit variance over normalised [0, 1]^3."""

    def __init__(self, rng: np.random.Generator, lattice: tuple[int, int, int]) -> None:
        shape = tuple(max(4, int(n)) for n in lattice)
        self.lattice = rng.standard_normal(shape, dtype=np.float32) * np.float32(_BSPLINE_GAIN)

    def planes(self, yq: np.ndarray, xq: np.ndarray) -> np.ndarray:
        """The field interpolated in y and x: (lattice z, len(yq), len(xq))."""
        lz, ly, lx = self.lattice.shape
        wy = _bspline_matrix(yq, ly)
        wx = _bspline_matrix(xq, lx)
        along_x = (self.lattice @ wx.T).transpose(1, 0, 2).reshape(ly, -1)  # (ly, lz * nx)
        planes = (wy @ along_x).reshape(len(yq), lz, len(xq))
        return np.ascontiguousarray(planes.transpose(1, 0, 2))

    def sample(self, zq: np.ndarray, planes: np.ndarray) -> np.ndarray:
        """The field at slices `zq` (normalised) over `planes` from `planes()`."""
        wz = _bspline_matrix(zq, planes.shape[0])
        flat = wz @ planes.reshape(planes.shape[0], -1)
        return flat.reshape(len(zq), *planes.shape[1:])


# --------------------------------------------------------------------------- scanner


@dataclass(frozen=True)
class _Scan:
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    thickness_mm: float
    noise_sigma_hu: float
    kvp: int


def _draw_scan(
    rng: np.random.Generator,
    slices: int | None,
    size: int,
    thickness_mm: float | None,
    pixel_spacing_mm: float | None,
) -> _Scan:
    """Scanner settings. Drawn values stay a whole chest: a small `size` gets a larger pixel
    spacing, and a given slice count spreads over a drawn chest length."""
    drawn_thickness = float(rng.choice(THICKNESSES_MM))
    drawn_spacing = float(rng.uniform(0.55, 0.9))
    chest_mm = float(rng.uniform(250.0, 350.0))
    sigma = float(rng.uniform(10.0, 30.0))
    kvp = int(rng.choice([100, 120, 140]))
    if pixel_spacing_mm is None:
        pixel_spacing_mm = round(drawn_spacing * 512 / size, 4)
    if slices is None:
        thickness = drawn_thickness if thickness_mm is None else float(thickness_mm)
        slices = int(np.clip(round(chest_mm / thickness), 60, 400))
        interval = thickness
    elif thickness_mm is None:
        interval = round(chest_mm / slices, 3)
        thickness = min(interval, drawn_thickness)
    else:
        interval = thickness = float(thickness_mm)
    spacing = (float(interval), float(pixel_spacing_mm), float(pixel_spacing_mm))
    return _Scan((int(slices), int(size), int(size)), spacing, float(thickness), sigma, kvp)


# --------------------------------------------------------------------------- anatomy


def _smoothstep(e0: float, e1: float, t: np.ndarray) -> np.ndarray:
    u = np.clip((t - e0) / (e1 - e0), 0.0, 1.0)
    return u * u * (3 - 2 * u)


@dataclass
class _Grid:
    """Where a render call evaluates: row and column positions (mm) and their 2D maps."""

    y: np.ndarray
    x: np.ndarray
    apex: np.ndarray
    dome: np.ndarray
    rib_phase: np.ndarray
    anterior: np.ndarray
    wall_planes: np.ndarray
    midline_planes: np.ndarray
    texture_planes: np.ndarray


class _Chest:
    """One patient's anatomy: sizes and positions in mm drawn from `rng`, rendered on demand.

    Along z the anatomy is laid out in fractions zeta of the scanned length (0 = thoracic
    inlet, 1 = upper abdomen); in-plane sizes scale with the patient's width."""

    def __init__(self, scan: _Scan, rng: np.random.Generator) -> None:
        nz, ny, nx = scan.shape
        dz, dy, dx = scan.spacing_mm
        self.scan = scan
        self.z_mm = np.arange(nz, dtype=np.float64) * dz
        self.zeta = (np.arange(nz, dtype=np.float64) + 0.5) / nz
        self.y_mm = ((np.arange(ny) - (ny - 1) / 2) * dy).astype(np.float32)
        self.x_mm = ((np.arange(nx) - (nx - 1) / 2) * dx).astype(np.float32)
        self.length_mm = nz * dz
        self._body(rng)
        self._mediastinum(rng)
        self.wall_field = _Field(rng, (self.length_mm / 45 + 4, 9, 9))
        self.texture_field = _Field(
            rng, (self.length_mm / 14 + 4, (self.hca0 + self.hcp0) / 14 + 4, 2 * self.wc0 / 14 + 4)
        )
        self.dome_field = _Field(rng, (4, 7, 7))

    # ---- parameters

    def _body(self, rng: np.random.Generator) -> None:
        fov_half = min(self.scan.shape[1] * self.scan.spacing_mm[1],
                       self.scan.shape[2] * self.scan.spacing_mm[2]) / 2
        drawn = float(rng.uniform(140.0, 185.0))
        self.w = min(drawn, 0.88 * fov_half)
        s = self.s = self.w / 160.0
        depth = 2 * self.w * float(rng.uniform(0.62, 0.74))
        self.ha, self.hp = 0.47 * depth, 0.53 * depth
        self.yc = (self.ha - self.hp) / 2
        self.fat = float(rng.uniform(4.0, 26.0)) * s
        self.muscle = float(rng.uniform(8.0, 15.0)) * s
        self.wc0 = self.w - (self.fat + self.muscle + 12 * s)
        self.hca0 = self.ha - (0.8 * self.fat + 0.6 * self.muscle + 8 * s)
        self.hcp0 = self.hp - (0.6 * self.fat + 1.4 * self.muscle + 10 * s)
        zeta = self.zeta
        self.body_scale = 0.84 + 0.16 * _smoothstep(0.0, 0.3, zeta) - 0.03 * _smoothstep(
            0.8, 1.0, zeta
        )
        shrink = 1 - self.body_scale
        self.wc = self.wc0 - shrink * self.w
        self.hca = self.hca0 - shrink * self.ha
        self.hcp = self.hcp0 - shrink * self.hp
        self.rib_pitch = float(rng.uniform(24.0, 30.0)) * s
        self.rib_drop = float(rng.uniform(60.0, 90.0)) * s
        self.rib_offset = float(rng.uniform(0.0, 1.0))
        self.rib_thickness = 9.0 * s
        self.apex_zeta = float(rng.uniform(0.02, 0.06))
        self.dome_right = float(rng.uniform(0.60, 0.70))
        self.dome_left = self.dome_right + float(rng.uniform(0.02, 0.06))
        self.disc_offset = float(rng.uniform(0.0, 1.0))
        self.table_gap = float(rng.uniform(5.0, 25.0))

    def _mediastinum(self, rng: np.random.Generator) -> None:
        s, lz = self.s, self.length_mm
        self.mid_x = 0.02 * self.wc0
        self.r_vb = 15.0 * s
        self.y_vb = self.yc + self.hcp - 0.5 * self.r_vb
        self.r_canal = 0.45 * self.r_vb
        y_vb0 = self.yc + self.hcp0 - 0.5 * self.r_vb
        self.carina = float(rng.uniform(0.28, 0.36))
        self.r_trachea = float(rng.uniform(8.0, 10.0)) * s
        self.y_trachea = y_vb0 - self.r_vb - 16 * s - self.r_trachea
        self.x_aorta_desc = self.r_vb + 17 * s
        self.r_aorta = float(rng.uniform(11.0, 14.0)) * s
        zc = self.carina * lz
        self.hilum_right = np.array([zc + 22 * s, self.y_trachea + 8 * s, -0.30 * self.wc0])
        self.hilum_left = np.array([zc + 35 * s, self.y_trachea + 10 * s, 0.32 * self.wc0])
        self.carina_point = np.array([zc, self.y_trachea, 0.0])
        self.y_ascending = self.y_trachea - 32 * s
        self.trunk = np.array([zc + 0.06 * lz, self.y_trachea - 40 * s, 22 * s])
        hay = 0.28 * (self.hca0 + self.hcp0)
        self.heart = (
            (self.dome_left - float(rng.uniform(0.05, 0.09))) * lz,
            self.yc - self.hca0 + hay + 5 * s,
            float(rng.uniform(0.08, 0.16)) * self.wc0,
        )
        self.heart_axes = (float(rng.uniform(0.15, 0.19)) * lz, hay, 0.42 * self.wc0)
        self.heart_top = (self.heart[0] - self.heart_axes[0]) / lz
        self.gas = rng.uniform() < 0.6

    # ---- grids

    def grid(self, yi: np.ndarray, xi: np.ndarray) -> _Grid:
        ny, nx = self.scan.shape[1:]
        y, x = self.y_mm[yi], self.x_mm[xi]
        yq, xq = yi / max(ny - 1, 1), xi / max(nx - 1, 1)
        y2, x2 = y[:, None].astype(np.float64), x[None, :].astype(np.float64)
        side_x = np.abs(x2 - self.mid_x)
        apex = self.apex_zeta + 0.45 * (
            ((side_x - 0.5 * self.wc0) / self.wc0) ** 2
            + ((y2 - self.yc - 0.1 * self.hcp0) / self.hcp0) ** 2
        )
        peak = np.where(x2 < self.mid_x, self.dome_right, self.dome_left)
        dome_field = self.dome_field.sample(np.array([0.5]), self.dome_field.planes(yq, xq))[0]
        dome = (
            peak
            + 0.55 * (((side_x - 0.4 * self.wc0) / self.wc0) ** 2
                      + ((y2 - self.yc + 0.1 * self.hca0) / self.hcp0) ** 2)
            + 0.08 * (y2 - self.yc) / self.hcp0
            + 0.012 * dome_field
        )
        radius = np.hypot(x2, y2 - self.yc) + 1e-6
        anterior = (1 - (y2 - self.yc) / radius) / 2
        rib_phase = self.rib_drop * anterior / self.rib_pitch - self.rib_offset
        return _Grid(
            y=y, x=x,
            apex=apex.astype(np.float32), dome=dome.astype(np.float32),
            rib_phase=rib_phase.astype(np.float32), anterior=anterior.astype(np.float32),
            wall_planes=self.wall_field.planes(yq, xq),
            midline_planes=self.wall_field.planes(yq, np.array([0.5])),
            texture_planes=self.texture_field.planes(yq, xq),
        )

    def crop(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns that can hold anything but air (body and table)."""
        y_hi = self.yc + self.hp + self.table_gap + 20 * self.s
        rows = np.flatnonzero((self.y_mm >= self.yc - self.ha - 2) & (self.y_mm <= y_hi))
        cols = np.flatnonzero(np.abs(self.x_mm) <= self.w + 2)
        return rows, cols

    # ---- rendering

    def render(self, zi: np.ndarray, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and lung mask of slices `zi` over grid `g`, before vessels, lesions
        and noise."""
        zeta, zmm = self.zeta[zi], self.z_mm[zi]
        z3 = zeta[:, None, None].astype(np.float32)
        y, x = g.y, g.x
        sb = self.body_scale[zi]
        hu = np.full((len(zi), len(y), len(x)), AIR_HU, dtype=np.float32)
        self._table(hu, y, x)
        wall = self.wall_field.sample(zeta, g.wall_planes)
        wall *= 0.05
        back = y[None, :] >= self.yc
        half_y = np.where(back, (sb * self.hp)[:, None], (sb * self.ha)[:, None])
        # the back lies flat on the table: a squarer curve behind the centre
        depth = np.abs((y[None, :] - self.yc) / half_y) ** np.where(back, 2.8, 2.0)
        rb = ((x[None, None, :] / (sb * self.w)[:, None, None]) ** 2).astype(np.float32) + (
            depth.astype(np.float32)[:, :, None])
        rb += wall
        np.copyto(hu, FAT_HU, where=rb < 1)
        muscle_r2 = ((1 - self.fat / (sb * self.w)) ** 2).astype(np.float32)
        np.copyto(hu, MUSCLE_HU, where=rb < muscle_r2[:, None, None])
        del rb

        half_c = np.where(y[None, :] < self.yc, self.hca[zi][:, None], self.hcp[zi][:, None])
        rc = ((x[None, None, :] / self.wc[zi][:, None, None]) ** 2).astype(np.float32) + (
            ((y[None, :] - self.yc) / half_c) ** 2
        ).astype(np.float32)[:, :, None]
        rc += wall
        self._ribs(hu, rc, zi, g)
        cavity = rc < 1
        del rc
        np.copyto(hu, MEDIASTINAL_FAT_HU, where=cavity)

        below = cavity & (z3 >= g.dome)
        organ = np.where(x < self.mid_x + 0.1 * self.wc0, LIVER_HU, SPLEEN_HU).astype(np.float32)
        np.copyto(hu, organ[None, None, :], where=below)
        medi = self._mediastinum_band(zi, g)
        self._structures(hu, medi, below, zi, zeta, zmm, y, x)

        lung = cavity
        lung &= z3 > g.apex
        lung &= z3 < g.dome
        lung &= ~medi
        parenchyma = self.texture_field.sample(zeta, g.texture_planes)
        parenchyma *= 15.0
        parenchyma += (LUNG_HU + 35.0 * (y - self.yc) / self.hcp0)[None, :, None]
        np.copyto(hu, parenchyma, where=lung)
        return hu, lung

    def _table(self, hu: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
        top = self.yc + self.hp + self.table_gap
        rows = (y >= top) & (y < top + 6 * self.s)
        cols = np.abs(x) < 0.85 * self.w
        hu[:, rows[:, None] & cols[None, :]] = TABLE_HU

    def _ribs(self, hu: np.ndarray, rc: np.ndarray, zi: np.ndarray, g: _Grid) -> None:
        """Ribs cut obliquely: short arcs just outside the pleura whose height drops from
        back to front, so each slice shows a different set."""
        outer = ((1 + self.rib_thickness / self.wc[zi]) ** 2).astype(np.float32)
        ring = (rc >= 1) & (rc < outer[:, None, None])
        s_i, y_i, x_i = np.nonzero(ring)
        phase = self.z_mm[zi][s_i] / self.rib_pitch - g.rib_phase[y_i, x_i]
        on = (phase - np.floor(phase)) < 0.38
        spine = (np.abs(g.x[x_i]) < 1.6 * self.r_vb) & (g.y[y_i] > self.yc)
        on &= ~spine
        value = np.where(g.anterior[y_i, x_i] > 0.9, CARTILAGE_HU, RIB_HU)
        hu[s_i[on], y_i[on], x_i[on]] = value[on]

    def _mediastinum_band(self, zi: np.ndarray, g: _Grid) -> np.ndarray:
        """The central column between the lungs: wider at the hila, narrow behind the
        sternum where the lungs almost meet, its edges wavy."""
        zeta = self.zeta[zi]
        hilum = self.carina + 0.08
        width = self.wc0 * (0.13 + 0.07 * np.exp(-(((zeta - hilum) / 0.08) ** 2)))
        front = self.yc - self.hca0
        taper = np.clip(0.45 + 0.55 * (g.y - front) / (0.6 * self.hca0), 0.45, 1.0)
        limit = (width[:, None, None] * taper[None, :, None]).astype(np.float32)
        limit *= 1 + 0.2 * self.wall_field.sample(zeta, g.midline_planes)
        return np.abs(g.x - self.mid_x)[None, None, :] < limit

    def _structures(
        self, hu: np.ndarray, medi: np.ndarray, below: np.ndarray, zi: np.ndarray,
        zeta: np.ndarray, zmm: np.ndarray, y: np.ndarray, x: np.ndarray,
    ) -> None:
        """Heart, great vessels, airways, oesophagus and spine, each drawn in its own box."""
        s = self.s
        n = len(zi)
        draw = _Painter(hu, medi, y, x)
        draw.ellipsoid(zmm, self.heart, self.heart_axes, BLOOD_HU, 5 * s, MEDIASTINAL_FAT_HU,
                       keep=~below)
        if self.gas:
            lz = self.length_mm
            centre = ((self.dome_left + 0.07) * lz, self.yc - 0.15 * self.hca0, 0.45 * self.wc0)
            draw.ellipsoid(zmm, centre, (0.05 * lz, 18 * s, 24 * s), AIR_HU, 0.0, AIR_HU,
                           keep=below, mark=False)
        y_vb = self.y_vb[zi]
        y_tr = np.full(n, self.y_trachea)
        upper = zeta < self.carina
        arch = (zeta >= self.carina - 0.1) & (zeta < self.carina - 0.05)
        ascending = (zeta >= self.carina - 0.07) & (zeta < self.heart_top + 0.02)
        descending = zeta >= self.carina - 0.08
        branches = zeta < self.carina - 0.09
        for dx_mm, dy_mm, r in ((-12, -14, 6.5), (10, -16, 5.5), (20, -4, 5.0), (-26, -6, 7.0)):
            draw.disc(y_tr + dy_mm * s, np.full(n, dx_mm * s), r * s, BLOOD_HU, 3 * s, branches)
        draw.disc(y_tr - 20 * s, np.full(n, -34 * s), 10 * s, BLOOD_HU, 3 * s,
                  (zeta > 0.08) & (zeta < self.carina + 0.08))
        draw.disc(np.full(n, self.y_ascending), np.full(n, -14 * s), 15 * s, BLOOD_HU, 3 * s,
                  ascending)
        draw.capsule2d(np.array([self.y_ascending, -14 * s]),
                       np.array([self.y_vb[zi].mean() - 0.2 * self.r_vb, self.x_aorta_desc]),
                       13 * s, BLOOD_HU, 3 * s, arch)
        draw.disc(y_vb - 0.2 * self.r_vb, np.full(n, self.x_aorta_desc), self.r_aorta, BLOOD_HU,
                  3 * s, descending)
        trunk = self.trunk
        trunk_on = (zeta > self.carina + 0.02) & (zeta < self.carina + 0.1)
        draw.disc(np.full(n, trunk[1]), np.full(n, trunk[2]), 14 * s, BLOOD_HU, 3 * s, trunk_on)
        for hilum in (self.hilum_right, self.hilum_left):
            draw.capsule3d(zmm, trunk, hilum + np.array([-8.0, -10.0, 0.0]) * s, 10 * s,
                           BLOOD_HU, 3 * s)
        # airways: wall first, then the lumen
        draw.disc(y_tr, np.zeros(n), self.r_trachea + 2.5 * s, AIRWAY_WALL_HU, 3 * s, upper)
        draw.disc(y_tr, np.zeros(n), self.r_trachea, AIR_HU, 0.0, upper)
        for hilum, r in ((self.hilum_right, 7.0 * s), (self.hilum_left, 6.0 * s)):
            draw.capsule3d(zmm, self.carina_point, hilum, r + 2 * s, AIRWAY_WALL_HU, 4 * s)
            draw.capsule3d(zmm, self.carina_point, hilum, r, AIR_HU, 0.0)
        draw.disc(y_vb - self.r_vb - 8 * s, np.full(n, 4 * s), 7 * s, ESOPHAGUS_HU, 3 * s,
                  np.ones(n, dtype=bool))
        self._spine(draw, zmm, y_vb)

    def _spine(self, draw: _Painter, zmm: np.ndarray, y_vb: np.ndarray) -> None:
        s, n, r = self.s, len(zmm), self.r_vb
        every = np.ones(n, dtype=bool)
        zero = np.zeros(n)
        draw.disc(y_vb, zero, r + 4 * s, MUSCLE_HU, 3 * s, every)
        draw.rect(y_vb, y_vb + 4 * r, -(r + 3 * s), r + 3 * s, MUSCLE_HU, every)
        level = zmm / (26.0 * s) + self.disc_offset
        disc = (level - np.floor(level)) < 0.2
        draw.disc(y_vb, zero, r, CORTICAL_HU, 0.0, every)
        draw.disc(y_vb, zero, r - 2 * s, CANCELLOUS_HU, 0.0, ~disc)
        draw.disc(y_vb, zero, r, DISC_HU, 0.0, disc)
        y_canal = y_vb + 1.45 * r + s
        draw.rect(y_canal - 4 * s, y_canal + 4 * s, -1.9 * r, 1.9 * r, CORTICAL_HU, ~disc)
        draw.disc(y_canal, zero, self.r_canal + 4 * s, CORTICAL_HU, 0.0, every)
        draw.rect(y_canal, y_canal + self.r_canal + 30 * s, -3 * s, 3 * s, CORTICAL_HU, ~disc)
        draw.disc(y_canal, zero, self.r_canal, CSF_HU, 0.0, every)


class _Painter:
    """Draws shapes into a slab (HU) and marks them, with a margin, as mediastinum so the
    lungs keep clear of them. Each shape touches only its bounding box."""

    def __init__(self, hu: np.ndarray, medi: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
        self.hu, self.medi, self.y, self.x = hu, medi, y, x

    def _box(self, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice] | None:
        ys = slice(int(np.searchsorted(self.y, y0)), int(np.searchsorted(self.y, y1, "right")))
        xs = slice(int(np.searchsorted(self.x, x0)), int(np.searchsorted(self.x, x1, "right")))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            return None
        return ys, xs

    def _apply(self, sel: np.ndarray, ys: slice, xs: slice, dist2: np.ndarray, value: float,
               margin2: np.ndarray | float) -> None:
        hu = self.hu[sel, ys, xs]
        np.copyto(hu, np.float32(value), where=dist2 < 1)
        self.hu[sel, ys, xs] = hu
        if np.any(np.asarray(margin2) > 1):
            self.medi[sel, ys, xs] |= dist2 < margin2

    def disc(self, cy: np.ndarray, cx: np.ndarray, r: float, value: float, margin: float,
             active: np.ndarray) -> None:
        sel = np.flatnonzero(active)
        if sel.size == 0 or r <= 0:
            return
        reach = r + margin
        box = self._box(cy[sel].min() - reach, cy[sel].max() + reach,
                        cx[sel].min() - reach, cx[sel].max() + reach)
        if box is None:
            return
        ys, xs = box
        d2 = ((self.y[ys][None, :, None] - cy[sel][:, None, None]) / r) ** 2 + (
            (self.x[xs][None, None, :] - cx[sel][:, None, None]) / r
        ) ** 2
        self._apply(sel, ys, xs, d2, value, (reach / r) ** 2)

    def rect(self, y0: np.ndarray, y1: np.ndarray, x0: float, x1: float, value: float,
             active: np.ndarray) -> None:
        sel = np.flatnonzero(active)
        if sel.size == 0:
            return
        box = self._box(y0[sel].min(), y1[sel].max(), x0, x1)
        if box is None:
            return
        ys, xs = box
        yy = self.y[ys][None, :, None]
        inside = (yy >= y0[sel][:, None, None]) & (yy <= y1[sel][:, None, None])
        inside = np.broadcast_to(inside, (sel.size, inside.shape[1], xs.stop - xs.start))
        self._apply(sel, ys, xs, np.where(inside, 0.0, 2.0), value, 1.5)

    def capsule2d(self, a: np.ndarray, b: np.ndarray, r: float, value: float, margin: float,
                  active: np.ndarray) -> None:
        """A bar of radius r between in-plane points a and b, (y, x) mm, on active slices."""
        sel = np.flatnonzero(active)
        if sel.size == 0:
            return
        reach = r + margin
        box = self._box(min(a[0], b[0]) - reach, max(a[0], b[0]) + reach,
                        min(a[1], b[1]) - reach, max(a[1], b[1]) + reach)
        if box is None:
            return
        ys, xs = box
        d2 = _segment_dist2(np.zeros(1), self.y[ys], self.x[xs],
                            np.array([0.0, *a]), np.array([0.0, *b]))[0] / r**2
        d2 = np.broadcast_to(d2, (sel.size, *d2.shape))
        self._apply(sel, ys, xs, d2, value, (reach / r) ** 2)

    def capsule3d(self, zmm: np.ndarray, a: np.ndarray, b: np.ndarray, r: float, value: float,
                  margin: float) -> None:
        """A tube of radius r between points a and b, (z, y, x) mm."""
        reach = r + margin
        sel = np.flatnonzero((zmm >= min(a[0], b[0]) - reach) & (zmm <= max(a[0], b[0]) + reach))
        if sel.size == 0:
            return
        box = self._box(min(a[1], b[1]) - reach, max(a[1], b[1]) + reach,
                        min(a[2], b[2]) - reach, max(a[2], b[2]) + reach)
        if box is None:
            return
        ys, xs = box
        d2 = _segment_dist2(zmm[sel], self.y[ys], self.x[xs], a, b) / r**2
        self._apply(sel, ys, xs, d2, value, (reach / r) ** 2)

    def ellipsoid(self, zmm: np.ndarray, centre: tuple[float, float, float],
                  axes: tuple[float, float, float], value: float, rim: float, rim_value: float,
                  keep: np.ndarray, mark: bool = True) -> None:
        """An axis-aligned ellipsoid (mm) with an optional rim of `rim_value`, drawn only
        where `keep` holds."""
        cz, cy, cx = centre
        az, ay, ax = axes
        dz2 = ((zmm - cz) / az) ** 2
        sel = np.flatnonzero(dz2 < 1)
        if sel.size == 0:
            return
        box = self._box(cy - ay - rim, cy + ay + rim, cx - ax - rim, cx + ax + rim)
        if box is None:
            return
        ys, xs = box
        d2 = (
            dz2[sel][:, None, None]
            + ((self.y[ys][None, :, None] - cy) / ay) ** 2
            + ((self.x[xs][None, None, :] - cx) / ax) ** 2
        )
        keep_box = keep[sel, ys, xs]
        hu = self.hu[sel, ys, xs]
        outer = (1 + rim / min(ax, ay)) ** 2
        np.copyto(hu, np.float32(rim_value), where=(d2 < outer) & keep_box)
        np.copyto(hu, np.float32(value), where=(d2 < 1) & keep_box)
        self.hu[sel, ys, xs] = hu
        if mark:
            self.medi[sel, ys, xs] |= d2 < outer


def _segment_dist2(z: np.ndarray, y: np.ndarray, x: np.ndarray, a: np.ndarray, b: np.ndarray,
                   slab_mm: float = 0.0) -> np.ndarray:
    """Squared distance (mm^2) from grid points to the segment a-b; each z sample stands for
    a slab of `slab_mm`, so its distance along z shrinks by half of that."""
    ab = b - a
    length2 = max(float(ab @ ab), 1e-9)
    pz = (z - a[0]).astype(np.float32)[:, None, None]
    py = (y - a[1]).astype(np.float32)[None, :, None]
    px = (x - a[2]).astype(np.float32)[None, None, :]
    t = (pz * np.float32(ab[0] / length2) + py * np.float32(ab[1] / length2)) + px * np.float32(
        ab[2] / length2
    )
    np.clip(t, 0, 1, out=t)
    rz = pz - t * np.float32(ab[0])
    if slab_mm > 0:
        rz = np.maximum(np.abs(rz) - np.float32(slab_mm / 2), 0)
    ry = py - t * np.float32(ab[1])
    ry *= ry
    rx = px - t * np.float32(ab[2])
    rx *= rx
    rz *= rz
    rz += ry
    rz += rx
    return rz


# --------------------------------------------------------------------------- vessels


@dataclass(frozen=True)
class _Planning:
    """A strided copy of the lung mask (every `stride` voxel) for placing trees and lesions,
    with each lung voxel's in-plane distance to the pleura (the PLR band's measure)."""

    stride: tuple[int, int, int]
    lung: np.ndarray
    pleura_mm: np.ndarray
    points_mm: np.ndarray
    """(n, 3) z, y, x mm of the lung voxels, in `np.argwhere` order."""
    index: np.ndarray
    """(n, 3) full-grid voxel indices of the same voxels."""


def _plan(chest: _Chest) -> _Planning:
    nz, ny, nx = chest.scan.shape
    dz, dy, dx = chest.scan.spacing_mm
    stride = (max(1, round(3.0 / dz)), max(1, round(3.0 / dy)), max(1, round(3.0 / dx)))
    zi = np.arange(0, nz, stride[0])
    grid = chest.grid(np.arange(0, ny, stride[1]), np.arange(0, nx, stride[2]))
    _, lung = chest.render(zi, grid)
    pleura = np.zeros(lung.shape, dtype=np.float32)
    for k in np.flatnonzero(lung.any(axis=(1, 2))):  # in-plane, as the PLR band is
        pleura[k] = ndi.distance_transform_edt(lung[k], sampling=(dy * stride[1], dx * stride[2]))
    coarse = np.argwhere(lung)
    index = coarse * np.array(stride)
    points = np.stack(
        [chest.z_mm[index[:, 0]], chest.y_mm[index[:, 1]], chest.x_mm[index[:, 2]]], axis=1
    ).astype(np.float64)
    return _Planning(stride, lung, pleura, points, index)


def _vessel_segments(
    chest: _Chest, plan: _Planning, rng: np.random.Generator, per_tree: int = 110
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Pulmonary artery and vein trees grown from each hilum toward random lung points:
    each branch heads halfway to the centroid of the points it serves, then splits them in
    two along their main axis. Radii follow Murray's law (r ~ n^(1/3))."""
    s = chest.s
    segments: list[tuple[np.ndarray, np.ndarray, float]] = []
    if len(plan.points_mm) == 0:
        return segments
    jitter = (rng.random(plan.points_mm.shape) - 0.5) * (
        np.array(plan.stride) * np.array(chest.scan.spacing_mm)
    )
    points = plan.points_mm + jitter
    right = points[:, 2] < chest.mid_x
    r_root = 6.0 * s
    r_min = 0.6 * s
    for side, hilum in ((right, chest.hilum_right), (~right, chest.hilum_left)):
        pool = points[side]
        if len(pool) == 0:
            continue
        lateral = np.sign(hilum[2]) * 6 * s
        roots = (hilum + np.array([-6 * s, -8 * s, lateral]),
                 hilum + np.array([28 * s, 12 * s, lateral]))
        for root in roots:
            take = rng.choice(len(pool), size=min(per_tree, len(pool)), replace=False)
            targets = pool[take]
            _grow(root, targets, len(targets), r_root, r_min, segments)
    return segments


def _grow(start: np.ndarray, targets: np.ndarray, n_root: int, r_root: float, r_min: float,
          out: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
    stack = [(start, targets)]
    while stack:
        origin, pts = stack.pop()
        radius = max(r_min, r_root * (len(pts) / n_root) ** (1 / 3))
        if len(pts) <= 2:
            out.extend((origin, p, max(r_min, 0.8 * radius)) for p in pts)
            continue
        centre = pts.mean(axis=0)
        end = origin + 0.5 * (centre - origin)
        out.append((origin, end, radius))
        centred = pts - centre
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        proj = centred @ axis
        lower = proj < np.median(proj)
        if lower.all() or not lower.any():
            lower = np.arange(len(pts)) < len(pts) // 2
        stack.extend(((end, pts[lower]), (end, pts[~lower])))


def _draw_vessels(hu: np.ndarray, lung: np.ndarray, chest: _Chest,
                  segments: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
    """Tubes of blood density in the lungs, with partial volume: a vessel thinner than the
    pixel, or lying in a slice thicker than itself, is fainter."""
    thickness = chest.scan.thickness_mm
    dx = chest.scan.spacing_mm[2]
    for a, b, r in segments:
        reach = np.array([r + thickness / 2, r + dx, r + dx])
        box = _index_box(chest, np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if box is None:
            continue
        zs, ys, xs = box
        lung_box = lung[zs, ys, xs]
        if not lung_box.any():
            continue
        d2 = _segment_dist2(chest.z_mm[zs], chest.y_mm[ys], chest.x_mm[xs], a, b, thickness)
        ab = b - a
        along_z = abs(ab[0]) / max(float(np.linalg.norm(ab)), 1e-9)
        contrast = 2 * r / (2 * r + thickness * math.sqrt(max(0.0, 1 - along_z**2)))
        contrast *= min(1.0, 2 * r / dx)  # and in a large pixel
        frac = np.sqrt(d2, out=d2)
        frac -= r
        frac *= np.float32(-1 / dx)
        frac += 0.5
        np.clip(frac, 0, 1, out=frac)
        value = frac * np.float32(contrast * (BLOOD_HU - LUNG_HU)) + np.float32(LUNG_HU)
        sub = hu[zs, ys, xs]  # a view: written in place
        np.maximum(sub, value, out=value)
        np.copyto(sub, value.astype(np.int16), where=lung_box & (frac > 0))


def _index_box(chest: _Chest, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Voxel slices covering the mm box [lo, hi] (z, y, x), or None when it is outside."""
    out = []
    for coord, a, b in zip((chest.z_mm, chest.y_mm, chest.x_mm), lo, hi, strict=True):
        start, stop = int(np.searchsorted(coord, a)), int(np.searchsorted(coord, b, "right"))
        if start >= stop:
            return None
        out.append(slice(start, stop))
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class _LesionPlan:
    centre: np.ndarray
    """Full-grid voxel index (z, y, x) of a lung voxel."""
    voxels: int
    """Target size."""
    periphery: float
    """Preference for voxels near the pleura (COVID > 0, CAP < 0)."""
    consolidation: float
    """Fraction of the lesion's voxels, from its core outward, that are consolidated."""
    paving: bool
    ggo_hu: float
    core_hu: float


def _lesion_count(label: Diagnosis, rng: np.random.Generator) -> int:
    if label == Diagnosis.COVID19:
        return int(np.clip(rng.poisson(4.4), 2, 8))
    if label == Diagnosis.CAP:
        return int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    return 0


def _plan_lesions(label: Diagnosis, plan: _Planning, chest: _Chest, lung_voxels: int,
                  rng: np.random.Generator) -> list[_LesionPlan]:
    """Where, how big and how dense each lesion is (paper Findings 1-4)."""
    count = _lesion_count(label, rng)
    if count == 0 or len(plan.points_mm) == 0:
        return []
    covid = label == Diagnosis.COVID19
    lvr = rng.lognormal(math.log(0.135 if covid else 0.04), 0.5)
    lvr = float(np.clip(lvr, 0.03, 0.30) if covid else np.clip(lvr, 0.01, 0.10))
    shares = rng.dirichlet(np.full(count, 1.5))
    sizes = np.maximum(1, np.round(shares * lvr * lung_voxels)).astype(int)
    centres = _covid_centres(count, plan, chest, rng) if covid else _cap_centres(
        count, plan, chest, rng)
    lesions = []
    for centre, voxels in zip(centres, sizes, strict=True):
        if covid:
            consolidation = float(rng.uniform(0.05, 0.2)) if rng.random() < 0.15 else 0.0
            lesions.append(_LesionPlan(
                centre, int(voxels), 0.6, consolidation, bool(rng.random() < 0.3),
                float(np.clip(rng.normal(-700, 55), -800, -590)),
                float(rng.uniform(-150, 0)),
            ))
        else:
            lesions.append(_LesionPlan(
                centre, int(voxels), 0.0, float(rng.uniform(0.35, 0.65)), False,
                float(np.clip(rng.normal(-720, 50), -820, -600)),
                float(rng.uniform(-20, 60)),
            ))
    return lesions


def _pick(weights: np.ndarray, rng: np.random.Generator) -> int | None:
    total = float(weights.sum())
    if total <= 0:
        return None
    return int(rng.choice(len(weights), p=weights / total))


def _covid_centres(count: int, plan: _Planning, chest: _Chest,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Subpleural, mostly posterior and lower, bilateral and spread apart."""
    pts = plan.points_mm
    pleura = plan.pleura_mm[tuple(np.argwhere(plan.lung).T)]
    zeta = pts[:, 0] / chest.length_mm
    back = (pts[:, 1] - pts[:, 1].min()) / max(np.ptp(pts[:, 1]), 1e-6)
    # against the ribs rather than the mediastinum: radial position in the chest cavity
    outer = np.hypot(pts[:, 2] / chest.wc0, (pts[:, 1] - chest.yc) / chest.hcp0)
    weights = np.exp(-(((pleura - 6.0 * chest.s) / (5.0 * chest.s)) ** 2)) * (0.4 + zeta) * (
        0.6 + back
    ) * np.clip(outer, 0, 1) ** 4
    right = pts[:, 2] < chest.mid_x
    first_right = rng.random() < 0.5
    chosen: list[int] = []
    for i in range(count):
        side = right if (i % 2 == 0) == first_right else ~right
        w = weights * side
        for j in chosen:
            near = np.sum((pts - pts[j]) ** 2, axis=1) < (45.0 * chest.s) ** 2
            w = np.where(near, w * 0.05, w)
        pick = _pick(w, rng)
        if pick is None:
            pick = _pick(weights + 1e-9, rng)
        chosen.append(int(pick))
    return [plan.index[j] for j in chosen]


def _cap_centres(count: int, plan: _Planning, chest: _Chest,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Central, in one lung and one region around a focus."""
    pts = plan.points_mm
    pleura = plan.pleura_mm[tuple(np.argwhere(plan.lung).T)]
    right = pts[:, 2] < chest.mid_x
    side = right if rng.random() < 0.55 else ~right
    if not side.any():
        side = ~side
    depth = np.clip((pleura - 6.0 * chest.s) / (16.0 * chest.s), 0, 1) ** 2
    focus = _pick(depth * side, rng)
    if focus is None:
        focus = _pick(side.astype(float) + 1e-9, rng)
    assert focus is not None
    chosen = [int(focus)]
    near = np.sum((pts - pts[focus]) ** 2, axis=1) < (35.0 * chest.s) ** 2
    for _ in range(count - 1):
        pick = _pick((depth + 0.02) * near * side, rng)
        chosen.append(int(focus if pick is None else pick))
    return [plan.index[j] for j in chosen]


def _draw_lesions(hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray, chest: _Chest,
                  plan: _Planning, lesions: list[_LesionPlan], rng: np.random.Generator) -> None:
    spacing = np.array(chest.scan.spacing_mm)
    voxel_mm3 = float(np.prod(spacing))
    for les in lesions:
        _draw_lesion(hu, lung, lesion, chest, plan, les, spacing, voxel_mm3, rng)


def _draw_lesion(hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray, chest: _Chest,
                 plan: _Planning, les: _LesionPlan, spacing: np.ndarray, voxel_mm3: float,
                 rng: np.random.Generator) -> None:
    """An irregular lesion: the `voxels` lung voxels scoring highest on an ellipsoid
    envelope plus smooth noise plus a pull toward (or away from) the pleura. It keeps one
    voxel clear of earlier lesions so that each stays its own connected component."""
    r_eq = (3 * les.voxels * voxel_mm3 / (4 * math.pi)) ** (1 / 3)
    axes = np.maximum(r_eq * np.exp(rng.normal(0, 0.25, 3)), spacing)
    angle = rng.uniform(0, math.pi)
    centre_mm = np.array([chest.z_mm[les.centre[0]], chest.y_mm[les.centre[1]],
                          chest.x_mm[les.centre[2]]])
    axes = _fit_envelope(chest, plan, lesion, centre_mm, axes, angle, les.voxels * voxel_mm3)
    box = _index_box(chest, centre_mm - 1.5 * axes, centre_mm + 1.5 * axes)
    assert box is not None  # the centre voxel is inside
    shape = (box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start)
    shape_mm = np.array(shape) * spacing
    free = lung[box] & ~_near(lesion, box)
    flat = np.flatnonzero(free)
    if flat.size == 0:
        return
    rel = [(coord[sl] - c).astype(np.float32) for coord, sl, c in zip(
        (chest.z_mm, chest.y_mm, chest.x_mm), box, centre_mm, strict=True)]
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * rel[1][:, None] + sin * rel[2][None, :]
    v = -sin * rel[1][:, None] + cos * rel[2][None, :]
    envelope = _box_field(rng, shape_mm, 0.5 * r_eq, shape)
    envelope *= 0.4
    envelope -= ((u / axes[1]) ** 2 + (v / axes[2]) ** 2)[None]
    envelope -= ((rel[0] / axes[0]) ** 2 - 1)[:, None, None]
    score = envelope.ravel()[flat]
    if les.periphery:
        score += les.periphery * _pleura_proximity(chest, plan, box).ravel()[flat]
    pick, threshold = _connected_top(score, flat, shape, les.voxels)
    flat, score = flat[pick], score[pick]
    depth = (score - threshold) / max(float(score.max() - threshold), 1e-6)
    texture = _box_field(rng, shape_mm, 6.0, shape).ravel()[flat]
    target = les.ggo_hu + 90 * (depth - 0.3) + 30 * texture
    if les.paving:
        fine = _box_field(rng, shape_mm, 4.0, shape).ravel()[flat]
        target += np.where(np.abs(fine) < 0.15, 160.0, 0.0).astype(np.float32)
    sub = hu[box]
    before = sub.ravel()[flat].astype(np.float32)
    # ground glass keeps the vessels visible: it only raises what lies below it
    alpha = np.clip(0.35 + 3 * depth, 0, 1)
    after = np.maximum(before, before + alpha * (target - before))
    if les.consolidation > 0:
        # a compact consolidated core (the smooth envelope's centre), hiding the vessels
        iz, iy, ix = np.unravel_index(flat, shape)
        core_rank = 0.15 * texture - (rel[0][iz] / axes[0]) ** 2 - (
            (u[iy, ix] / axes[1]) ** 2 + (v[iy, ix] / axes[2]) ** 2)
        core = core_rank >= np.quantile(core_rank, 1 - les.consolidation)
        after = np.where(core, les.core_hu + 25 * texture, after)
    values = sub.ravel()
    values[flat] = np.rint(after).astype(np.int16)
    hu[box] = values.reshape(shape)
    mask = lesion[box].ravel()
    mask[flat] = True
    lesion[box] = mask.reshape(shape)


def _near(mask: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Voxels of `box` that are in `mask` or touch it (26-neighbours), looking one voxel
    beyond the box so that nothing just outside it is missed."""
    wide = tuple(slice(max(0, sl.start - 1), min(n, sl.stop + 1))
                 for sl, n in zip(box, mask.shape, strict=True))
    near = mask[wide]
    if near.any():
        near = ndi.binary_dilation(near, structure=np.ones((3, 3, 3), dtype=bool))
    inner = tuple(slice(sl.start - w.start, sl.stop - w.start)
                  for sl, w in zip(box, wide, strict=True))
    return near[inner]


def _fit_envelope(chest: _Chest, plan: _Planning, lesion: np.ndarray, centre_mm: np.ndarray,
                  axes: np.ndarray, angle: float, volume_mm3: float) -> np.ndarray:
    """Widen the envelope until it holds 1.2 times the lesion's volume of free lung (a
    lesion against the pleura has half its envelope outside), counted on the planning grid."""
    free = ~lesion[tuple(plan.index.T)]
    z, y, x = (plan.points_mm[free, i] - centre_mm[i] for i in range(3))
    u = math.cos(angle) * y + math.sin(angle) * x
    v = -math.sin(angle) * y + math.cos(angle) * x
    cell_mm3 = float(np.prod(np.array(plan.stride) * np.array(chest.scan.spacing_mm)))
    for _ in range(8):
        inside = (z / axes[0]) ** 2 + (u / axes[1]) ** 2 + (v / axes[2]) ** 2 < 1
        if np.count_nonzero(inside) * cell_mm3 >= 1.2 * volume_mm3:
            break
        axes = axes * 1.2
    return axes


def _connected_top(score: np.ndarray, flat: np.ndarray, shape: tuple[int, int, int],
                   voxels: int) -> tuple[np.ndarray, float]:
    """The `voxels` best-scoring voxels (flat indices into a box of `shape`) that stay
    connected to the best one: noise would otherwise leave satellite specks that count as
    extra lesions. Voxels lost as specks are offered again once, so the size stays close."""
    wanted = voxels
    best = int(np.argmax(score))
    for _ in range(2):
        k = min(wanted, score.size)
        threshold = float(np.partition(score, score.size - k)[score.size - k])
        pick = score >= threshold
        grid = np.zeros(shape, dtype=bool)
        grid.ravel()[flat[pick]] = True
        labels, _ = ndi.label(grid, structure=np.ones((3, 3, 3), dtype=bool))
        labels = labels.ravel()
        pick &= labels[flat] == labels[flat[best]]
        lost = k - int(np.count_nonzero(pick))
        if lost <= 0.02 * k or wanted >= score.size:
            break
        wanted += lost
    return pick, threshold


def _box_field(rng: np.random.Generator, shape_mm: np.ndarray, scale_mm: float,
               shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth noise over a box with features of about `scale_mm`."""
    cells = np.minimum(np.ceil(shape_mm / max(scale_mm, 1e-3)), shape)  # no finer than voxels
    lattice = tuple(int(n) + 3 for n in cells)
    field = _Field(rng, (lattice[0], lattice[1], lattice[2]))
    zq, yq, xq = (np.linspace(0.0, 1.0, n) for n in shape)
    return field.sample(zq, field.planes(yq, xq))


def _pleura_proximity(chest: _Chest, plan: _Planning,
                      box: tuple[slice, slice, slice]) -> np.ndarray:
    """1 at the pleura falling to 0 at 15 mm inside, over `box`, linearly interpolated from
    the planning grid's in-plane distances one axis at a time."""
    dist = plan.pleura_mm
    for axis, (sl, stride) in enumerate(zip(box, plan.stride, strict=True)):
        n = dist.shape[axis]
        pos = np.clip(np.arange(sl.start, sl.stop) / stride, 0, n - 1)
        lo = np.minimum(np.floor(pos).astype(np.int64), max(n - 2, 0))
        hi = np.minimum(lo + 1, n - 1)
        shape = [1, 1, 1]
        shape[axis] = pos.size
        w = (pos - lo).astype(np.float32).reshape(shape)
        dist = np.take(dist, lo, axis=axis) * (1 - w) + np.take(dist, hi, axis=axis) * w
    return np.clip(1 - dist / np.float32(15.0 * chest.s), 0, 1)


# --------------------------------------------------------------------------- assembly


def settings_problems(
    seed: int,
    slices: int | None,
    size: int,
    slice_thickness_mm: float | None,
    pixel_spacing_mm: float | None,
) -> list[str]:
    """What is wrong with these `generate_phantom` settings (empty: nothing), so that a
    data spec can be refused when it is read, not when its first phantom is made."""
    return [text for bad, text in (
        (seed < 0, f"seed must be >= 0, got {seed}"),
        (size < 16, f"size must be >= 16, got {size}"),
        (slices is not None and slices < 1, f"slices must be >= 1, got {slices}"),
        (slice_thickness_mm is not None and not slice_thickness_mm > 0,
         f"slice thickness must be > 0 mm, got {slice_thickness_mm}"),
        (pixel_spacing_mm is not None and not pixel_spacing_mm > 0,
         f"pixel spacing must be > 0 mm, got {pixel_spacing_mm}"),
    ) if bad]


def generate_phantom(
    kind: Diagnosis | str,
    seed: int,
    *,
    slices: int | None = None,
    size: int = 512,
    slice_thickness_mm: float | None = None,
    pixel_spacing_mm: float | None = None,
) -> Phantom:
    """A synthetic chest CT of class `kind`, the same for the same arguments. Settings left
    None are drawn from the seed (thickness 1-5 mm, pixel spacing 0.55-0.9 mm at 512, a
    250-350 mm chest in 60-400 slices)."""
    label = parse_kind(kind)
    problems = settings_problems(seed, slices, size, slice_thickness_mm, pixel_spacing_mm)
    if problems:
        raise ValueError("; ".join(problems))
    started = time.perf_counter()
    streams = np.random.SeedSequence([int(seed), int(label)]).spawn(5)
    rng_scan, rng_body, rng_vessels, rng_lesions, rng_noise = (
        np.random.default_rng(s) for s in streams
    )
    scan = _draw_scan(rng_scan, slices, size, slice_thickness_mm, pixel_spacing_mm)
    chest = _Chest(scan, rng_body)
    plan = _plan(chest)
    hu, lung = _render_volume(chest)
    _draw_vessels(hu, lung, chest, _vessel_segments(chest, plan, rng_vessels))
    lesion = np.zeros_like(lung)
    lesions = _plan_lesions(label, plan, chest, int(np.count_nonzero(lung)), rng_lesions)
    _draw_lesions(hu, lung, lesion, chest, plan, lesions, rng_lesions)
    _add_noise(hu, scan.noise_sigma_hu, rng_noise)
    log.debug("phantom %s seed %d %s generated in %.2f s", KIND_NAMES[label], seed,
              "x".join(map(str, scan.shape)), time.perf_counter() - started)
    return Phantom(
        volume_hu=hu, spacing_mm=scan.spacing_mm, lung_mask=lung, lesion_mask=lesion,
        label=label, seed=int(seed), slice_thickness_mm=scan.thickness_mm,
        noise_sigma_hu=scan.noise_sigma_hu, patient_width_mm=2 * chest.w, kvp=scan.kvp,
        lesions_planned=len(lesions),
    )


def _render_volume(chest: _Chest) -> tuple[np.ndarray, np.ndarray]:
    nz, ny, nx = chest.scan.shape
    hu = np.full((nz, ny, nx), int(AIR_HU), dtype=np.int16)
    lung = np.zeros((nz, ny, nx), dtype=bool)
    rows, cols = chest.crop()
    if rows.size == 0 or cols.size == 0:
        return hu, lung
    grid = chest.grid(rows, cols)
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    step = max(1, _SLAB_VOXELS // (rows.size * cols.size))
    for z0 in range(0, nz, step):
        zi = np.arange(z0, min(nz, z0 + step))
        slab, slab_lung = chest.render(zi, grid)
        hu[zi[0]:zi[-1] + 1, ys, xs] = np.rint(slab)
        lung[zi[0]:zi[-1] + 1, ys, xs] = slab_lung
    return hu, lung


def _add_noise(hu: np.ndarray, sigma: float, rng: np.random.Generator, bank: int = 16) -> None:
    """Quantum noise with the fine in-plane correlation of filtered back-projection, then the
    stored range's clip. Slices take patterns from a bank of independent noise images, each
    circularly shifted and flipped at random: drawing a fresh normal per voxel would triple
    the generation time, and shifted white noise stays white and uncorrelated between
    slices."""
    nz, ny, nx = hu.shape
    patterns = rng.standard_normal((min(bank, nz), ny, nx), dtype=np.float32)
    patterns = ndi.gaussian_filter(patterns, sigma=(0, 0.6, 0.6), mode="wrap")
    patterns *= np.float32(sigma) / max(float(patterns.std()), 1e-6)
    patterns = np.rint(patterns).astype(np.int16)
    picks = rng.integers(0, len(patterns), nz)
    shifts = rng.integers(0, (ny, nx), size=(nz, 2))
    flips = rng.random((nz, 2)) < 0.5
    for k in range(nz):
        pattern = patterns[picks[k]]
        pattern = pattern[::-1] if flips[k, 0] else pattern
        pattern = pattern[:, ::-1] if flips[k, 1] else pattern
        hu[k] += np.roll(pattern, tuple(shifts[k]), axis=(0, 1))
    np.clip(hu, HU_MIN, HU_MAX, out=hu)


# --------------------------------------------------------------------------- writers


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[f"{p}|" for p in ("dicomnode-phantom", *parts)]))


def _case_key(phantom: Phantom) -> tuple[object, ...]:
    """What makes one phantom's pixels: two phantoms that differ in any of it must not
    share a UID (the slice thickness changes the partial volume at the same spacing)."""
    return (phantom.kind, phantom.seed, phantom.volume_hu.shape, phantom.spacing_mm,
            phantom.slice_thickness_mm)


def _character_set(*texts: str) -> str:
    """ISO_IR 100 (Latin-1) when every text fits it, else ISO_IR 192 (UTF-8): a name in
    another script must not be written as question marks."""
    try:
        for text in texts:
            text.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


def _ds_number(value: float) -> str:
    """A DS value: at most 16 characters, no exponent for the magnitudes used here."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]


def write_dicom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "Phantom chest CT",
    accession: str = "",
) -> list[Path]:
    """One CT Image Storage file per slice (explicit VR little endian), slice 0 the most
    superior, named CT0001.dcm ... UIDs, dates and patient identity derive from the
    phantom's seed unless given, so the same phantom always makes the same series (a
    series UID from the study UID as well: one series is never in two studies). A folder
    that already holds such files of another series is refused: mixed, the two would read
    as one broken series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    out_dir = Path(out_dir)
    key = _case_key(phantom)
    study_uid = study_uid or _uid("study", *key)
    series_uid = series_uid or default_series_uid(phantom, study_uid)
    refuse_other_series(out_dir, series_uid)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_uid = _uid("frame", study_uid, series_uid)
    day = datetime.date(2020, 1, 1) + datetime.timedelta(days=phantom.seed % 1500)
    date = day.strftime("%Y%m%d")
    clock = f"{8 + phantom.seed % 10:02d}{phantom.seed % 60:02d}00"
    dz, dy, dx = phantom.spacing_mm
    nz, ny, nx = phantom.volume_hu.shape
    x0, y0 = -(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy
    stored = (phantom.volume_hu.astype(np.int32) - HU_MIN).clip(0, 4095).astype(np.uint16)

    common = Dataset()
    patient_name = patient_name or f"Phantom^{phantom.kind.upper()}{phantom.seed}"
    patient_id = patient_id or f"PHANTOM-{phantom.kind.upper()}-{phantom.seed}"
    common.SpecificCharacterSet = _character_set(patient_name, patient_id, series_description,
                                                 accession)
    common.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    common.SOPClassUID = CTImageStorage
    common.StudyDate = common.SeriesDate = common.AcquisitionDate = common.ContentDate = date
    common.StudyTime = common.SeriesTime = common.AcquisitionTime = common.ContentTime = clock
    common.AccessionNumber = accession
    common.Modality = "CT"
    common.Manufacturer = MANUFACTURER
    common.ManufacturerModelName = "training.phantoms"
    common.InstitutionName = "dicomnode"
    common.ReferringPhysicianName = ""
    common.StudyDescription = "Synthetic chest CT"
    common.SeriesDescription = series_description
    common.PatientName = patient_name
    common.PatientID = patient_id
    common.PatientBirthDate = ""
    common.PatientSex = "O"
    common.BodyPartExamined = "CHEST"
    common.SliceThickness = _ds_number(phantom.slice_thickness_mm)
    common.KVP = str(phantom.kvp)
    common.SpacingBetweenSlices = _ds_number(dz)
    common.PatientPosition = "HFS"
    common.StudyInstanceUID = study_uid
    common.SeriesInstanceUID = series_uid
    common.StudyID = "1"
    common.SeriesNumber = 1
    common.AcquisitionNumber = 1
    common.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    common.FrameOfReferenceUID = frame_uid
    common.PositionReferenceIndicator = ""
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows = ny
    common.Columns = nx
    common.PixelSpacing = [_ds_number(dy), _ds_number(dx)]
    common.BitsAllocated = 16
    common.BitsStored = 12
    common.HighBit = 11
    common.PixelRepresentation = 0
    common.WindowCenter = "-600"
    common.WindowWidth = "1500"
    common.RescaleIntercept = str(HU_MIN)
    common.RescaleSlope = "1"
    common.RescaleType = "HU"

    paths = []
    for k in range(nz):
        ds = Dataset()
        ds.update(common)
        sop_uid = _uid("instance", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        z = -k * dz
        ds.ImagePositionPatient = [_ds_number(x0), _ds_number(y0), _ds_number(z)]
        ds.SliceLocation = _ds_number(z)
        ds.PixelData = stored[k].tobytes()
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    log.info("wrote %d CT slices to %s", len(paths), out_dir)
    return paths


def refuse_other_series(out_dir: Path, series_uid: str) -> None:
    """Raise ValueError when `out_dir` holds phantom CT files (CT0001.dcm ...) of a series
    other than `series_uid`: mixed, the two would read as one broken series."""
    import pydicom

    earlier = sorted(Path(out_dir).glob("CT[0-9][0-9][0-9][0-9].dcm"))
    if earlier:
        other = pydicom.dcmread(earlier[0], stop_before_pixels=True, force=True)
        if str(other.get("SeriesInstanceUID", "")) != series_uid:
            raise ValueError(f"{out_dir} already holds {len(earlier)} CT file(s) of another"
                             " series (CT0001.dcm ...): write into an empty folder")


def default_series_uid(phantom: Phantom, study_uid: str | None = None) -> str:
    """The Series Instance UID `write_dicom_series` gives the phantom unless told (from the
    study's: one series is never in two studies)."""
    key = _case_key(phantom)
    return _uid("series", study_uid or _uid("study", *key), *key)


def affine_ras(phantom: Phantom) -> np.ndarray:
    """The NIfTI (RAS) affine of the volume written by `write_nifti`, matching the DICOM
    geometry: columns go to patient left, rows to posterior, slices to inferior."""
    dz, dy, dx = phantom.spacing_mm
    nz, ny, nx = phantom.volume_hu.shape
    affine = np.diag([-dx, -dy, -dz, 1.0])
    affine[:3, 3] = [(nx - 1) / 2 * dx, (ny - 1) / 2 * dy, 0.0]
    return affine


def write_nifti(phantom: Phantom, out_dir: Path, *, case_id: str | None = None) -> dict[str, Path]:
    """The image (int16 HU) and its lung and lesion masks (uint8) as NIfTI-1, arrays in
    (x, y, z) order with the affine from the spacing. Keys: image, lung, lesion. The
    header's description names the phantom (kind, seed and a UID of its settings); files
    of another phantom under the same names (the same kind and seed at another size) are
    refused, not overwritten."""
    import nibabel as nib

    out_dir = Path(out_dir)
    case_id = case_id or _default_case_id(phantom)
    identity = _nifti_identity(phantom)
    refuse_other_nifti(phantom, out_dir, case_id=case_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine = affine_ras(phantom)
    arrays = {
        "image": phantom.volume_hu.astype(np.int16),
        "lung": phantom.lung_mask.astype(np.uint8),
        "lesion": phantom.lesion_mask.astype(np.uint8),
    }
    paths = {}
    for name, array in arrays.items():
        image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
        image.header.set_xyzt_units("mm")
        image.header["descrip"] = identity
        image.header.set_qform(affine, code=1)
        image.header.set_sform(affine, code=1)
        path = out_dir / f"{case_id}_{name}.nii.gz"
        nib.save(image, path)
        paths[name] = path
    log.info("wrote NIfTI %s to %s", case_id, out_dir)
    return paths


def _default_case_id(phantom: Phantom) -> str:
    return f"phantom_{phantom.kind}_{phantom.seed:05d}"


def _nifti_identity(phantom: Phantom) -> str:
    """The NIfTI header description naming the phantom (at most 80 characters)."""
    return f"phantom {_uid('nifti', *_case_key(phantom))}"


def refuse_other_nifti(phantom: Phantom, out_dir: Path, *, case_id: str | None = None) -> None:
    """Raise ValueError when `out_dir` holds the NIfTI image `write_nifti` would write, but
    of another phantom (the same kind and seed at another size has the same file names)."""
    import nibabel as nib

    earlier = Path(out_dir) / f"{case_id or _default_case_id(phantom)}_image.nii.gz"
    if not earlier.exists():
        return
    try:
        description = nib.load(earlier).header["descrip"].item().decode("ascii", "replace")
    except Exception as exc:  # nibabel raises several types for a damaged file
        description = f"unreadable ({exc})"
    if description != _nifti_identity(phantom):
        what = description or "no phantom identity: another tool's, or written before"
        raise ValueError(f"{earlier} is another image ({what}): write into another"
                         " folder, or remove it")


# --------------------------------------------------------------------------- CLI


def add_phantom_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `dicomnode phantom`."""
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--kind", default="covid", choices=sorted(_KIND_ALIASES),
                        help="class of the phantom (default: covid)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--slices", type=int, default=None,
                        help="number of slices (default: drawn, 60-400)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default: 512)")
    parser.add_argument("--thickness", type=float, default=None, dest="slice_thickness_mm",
                        help="slice thickness in mm (default: drawn, 1-5)")
    parser.add_argument("--pixel-spacing", type=float, default=None, dest="pixel_spacing_mm",
                        help="pixel spacing in mm (default: drawn, 0.55-0.9 at 512)")
    parser.add_argument("--format", default="dicom", choices=("dicom", "nifti", "both"),
                        help="what to write (default: dicom)")


def run_phantom_command(args: argparse.Namespace) -> int:
    """Generate one phantom and write it; prints where it went (2 and why on bad
    settings)."""
    out = Path(args.out)
    written: list[str] = []
    try:
        phantom = generate_phantom(
            args.kind, args.seed, slices=args.slices, size=args.size,
            slice_thickness_mm=args.slice_thickness_mm, pixel_spacing_mm=args.pixel_spacing_mm,
        )
        dicom_dir = out / "dicom" if args.format == "both" else out
        nifti_dir = out / "nifti" if args.format == "both" else out
        if args.format == "both":  # refused before either is written, not half-way
            refuse_other_series(dicom_dir, default_series_uid(phantom))
            refuse_other_nifti(phantom, nifti_dir)
        if args.format in ("dicom", "both"):
            files = write_dicom_series(phantom, dicom_dir)
            written.append(f"{len(files)} DICOM files in {files[0].parent}")
        if args.format in ("nifti", "both"):
            nifti = write_nifti(phantom, nifti_dir)
            written.extend(str(p) for p in nifti.values())
    except (ValueError, OSError) as exc:  # bad settings; an OUT that cannot be written
        log.error("phantom: %s", exc)
        return 2
    summary = _summary(phantom)
    print(summary)
    for line in written:
        print(line)
    return 0


def _summary(phantom: Phantom) -> str:
    dz, dy, _ = phantom.spacing_mm
    nz, ny, nx = phantom.volume_hu.shape
    return (
        f"{CLASS_NAMES[phantom.label]} phantom, seed {phantom.seed}: {nz}x{ny}x{nx}, "
        f"{dz:g} mm slices ({phantom.slice_thickness_mm:g} mm thick), {dy:g} mm pixels, "
        f"{phantom.lesions_planned} lesions, LVR {100 * phantom.lvr:.1f} %"
    )

