"""Visual QC figures: every drawing dwiflow makes, in one module (matplotlib, Agg canvas, no display).

What is drawn follows what users check in the MRtrix3 / DIPY tutorials and in QSIRecon's reports:
the response function's shape per shell and its voxel selection, FOD glyphs with their peaks on a
slice patch, scalar mosaics with colour bars, and per-voxel status maps.

Orientation: images are reoriented to the closest RAS voxel order (no resampling) and axial slices
are drawn seen from above with the subject's left on the image left (neurological convention);
every figure says so. Orientation-encoding images (SH, peaks) are in the world (xyz) frame, so
after a reorientation that only permutes/flips voxel axes their lobes are drawn along the world
x (image right = subject's right) and y (image up = anterior) axes.

The stage :func:`figures_stage` draws everything a run's staged derivatives allow; a figure that
cannot be drawn becomes a note in the manifest (``figures.json``) instead of failing the run.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dwiflow.bids_specs.outputs import output_filename
from dwiflow.tasks.io import in_mrtrix3_basis

ORIENTATION_NOTE = "Neurological convention: axial slices seen from above, subject's left (L) on the image left."
DIRECTION_COLOUR_NOTE = "Glyph colour: direction (red = left-right, green = anterior-posterior, blue = inferior-superior)."


# --------------------------------------------------------------------------------------------- images
@dataclass
class CanonicalImage:
    """An image in the closest RAS voxel order: ``data[i, j, k, ...]`` with i → right, j → anterior, k → superior."""

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]


def load_canonical(path: str | Path, dtype: Any = np.float32) -> CanonicalImage:
    """Load a NIfTI image and reorient its voxel axes to RAS (permutations and flips only, no resampling).

    Vector and SH contents are not changed: they are in the world frame already.
    """
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=dtype)
    return CanonicalImage(data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3]))


def axial_slices(mask: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` axial slice indices spread over the mask's extent (all of them when fewer)."""
    occupied = np.flatnonzero(mask.any(axis=(0, 1)))
    if occupied.size == 0:
        return []
    if occupied.size <= count:
        return [int(k) for k in occupied]
    picks = np.linspace(occupied[0], occupied[-1], count + 2)[1:-1]
    return sorted({int(round(k)) for k in picks})


def _bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    xy = mask.any(axis=2) if mask.ndim == 3 else mask
    if not xy.any():
        return slice(None), slice(None)
    xs, ys = np.flatnonzero(xy.any(axis=1)), np.flatnonzero(xy.any(axis=0))
    return (slice(max(xs[0] - margin, 0), xs[-1] + margin + 1), slice(max(ys[0] - margin, 0), ys[-1] + margin + 1))


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _widen_for_text(fig) -> None:
    """Widen ``fig`` until every line of text drawn on it (title, notes, annotations) fits, keeping every axes' size
    and place and the texts' left ends: a figure sized for its slices (one or two of a thin volume) is narrower
    than its orientation note or a long title."""
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    texts = [t for t in [*fig.texts, getattr(fig, "_suptitle", None)] if t is not None and t.get_text()]
    needed = width
    for text in texts:
        box = text.get_window_extent(renderer)
        if text.get_horizontalalignment() == "left":
            needed = max(needed, box.x1 + 4)
        else:  # centred (the title): as wide as the text
            needed = max(needed, box.width + 8)
    if needed <= width + 0.5:
        return
    scale = needed / width
    fig.set_figwidth(fig.get_figwidth() * scale)
    for ax in fig.axes:
        position = ax.get_position()
        ax.set_position([position.x0 / scale, position.y0, position.width / scale, position.height])
    for text in fig.texts:
        if text.get_horizontalalignment() == "left":
            x, y = text.get_position()
            text.set_position((x / scale, y))


def _save(fig, out: Path, dpi: int = 110) -> Path:
    _widen_for_text(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.png")
    fig.savefig(tmp, dpi=dpi, format="png")
    tmp.replace(out)
    return out


def _label_orientation(ax) -> None:
    kw = dict(transform=ax.transAxes, color="white", fontsize=8, fontweight="bold", va="center",
              bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.5, linewidth=0))
    ax.text(0.02, 0.5, "L", ha="left", **kw)
    ax.text(0.98, 0.5, "R", ha="right", **kw)


def _show_slice(ax, image: np.ndarray, box: tuple[slice, slice], **imshow) -> Any:
    """Draw ``image[box]`` (x right, y up) with equal aspect, axes hidden."""
    handle = ax.imshow(image[box].T, origin="lower", interpolation="nearest", **imshow)
    ax.set_xticks([])
    ax.set_yticks([])
    return handle


# --------------------------------------------------------------------------------------------- mosaics
@dataclass
class MapPanel:
    """One row of a mosaic: a 3D map with its colour scale."""

    title: str
    data: np.ndarray
    units: str = ""
    cmap: str = "gray"
    vmin: float | None = None
    vmax: float | None = None


def _robust_limits(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1, 99])
    if high <= low:
        high = low + (abs(low) or 1.0) * 1e-3
    return float(low), float(high)


def mosaic_figure(out: Path, panels: Sequence[MapPanel], mask: np.ndarray, title: str, n_slices: int = 6) -> Path:
    """Rows of axial slices (one row per map) over the mask, each row with its colour bar.

    Voxels outside the mask and NaN voxels are drawn dark grey.
    """
    slices = axial_slices(mask, n_slices)
    if not slices:
        raise ValueError("the brain mask is empty")
    box = _bounding_box(mask)
    nx, ny = mask[box].shape[:2]
    cell = 1.9
    aspect = ny / max(nx, 1)
    fig = _new_figure(cell * len(slices) + 2.0, cell * aspect * len(panels) + 1.2 + 0.14 * len(panels))
    # the colour bars' tick labels and unit label need about 0.9 in on the right
    grid = fig.add_gridspec(len(panels), len(slices) + 1, width_ratios=[1] * len(slices) + [0.06],
                            left=0.02, right=1 - 0.95 / fig.get_figwidth(), top=1 - 0.8 / fig.get_figheight(),
                            bottom=(0.35 + 0.14 * len(panels)) / fig.get_figheight(), wspace=0.03, hspace=0.12)
    ranges = []
    for row, panel in enumerate(panels):
        values = np.where(mask, panel.data, np.nan)
        vmin, vmax = _robust_limits(values)
        fixed = panel.vmin is not None and panel.vmax is not None
        vmin = panel.vmin if panel.vmin is not None else vmin
        vmax = panel.vmax if panel.vmax is not None else vmax
        ranges.append(f"{panel.title}: {vmin:.3g} to {vmax:.3g}{' ' + panel.units if panel.units not in ('', 'arbitrary') else ''}"
                      + (" (fixed)" if fixed else " (1st to 99th percentile in the mask)"))
        handle = None
        for col, k in enumerate(slices):
            ax = fig.add_subplot(grid[row, col])
            ax.set_facecolor("#303030")
            handle = _show_slice(ax, values[..., k], box, cmap=panel.cmap, vmin=vmin, vmax=vmax)
            if col == 0:
                ax.set_ylabel(panel.title, fontsize=9)
                _label_orientation(ax)
            if row == 0:
                ax.set_title(f"z = {k}", fontsize=8)
        bar = fig.colorbar(handle, cax=fig.add_subplot(grid[row, -1]))
        bar.ax.tick_params(labelsize=7)
        if panel.units and panel.units != "arbitrary":
            bar.set_label(panel.units, fontsize=7)
    fig.suptitle(title, fontsize=11)
    for line, text in enumerate(ranges):
        fig.text(0.01, (0.2 + 0.14 * (len(ranges) - line)) / fig.get_figheight(), "Colour range of " + text,
                 fontsize=6.5, color="#444444")
    fig.text(0.01, 0.06 / fig.get_figheight(), ORIENTATION_NOTE, fontsize=7, color="#444444")
    return _save(fig, out)


def comparison_figure(out: Path, maps: np.ndarray, fits: Sequence[str], indices: Sequence[str], mask: np.ndarray,
                      title: str) -> Path:
    """Fits side by side (columns) for each index (rows) on one axial slice, one colour scale per row set by the
    first fit (as DIPY's MAP-MRI tutorial ``compare_maps``). ``maps``: (x, y, z, fits × indices), fit-major."""
    slices = axial_slices(mask, 1)
    if not slices:
        raise ValueError("the brain mask is empty")
    k = slices[0]
    box = _bounding_box(mask)
    nx, ny = mask[box].shape[:2]
    cell = 2.0
    fig = _new_figure(cell * len(fits) + 1.6, cell * ny / max(nx, 1) * len(indices) + 1.0)
    grid = fig.add_gridspec(len(indices), len(fits) + 1, width_ratios=[1] * len(fits) + [0.06], left=0.08, right=0.9,
                            top=1 - 0.7 / fig.get_figheight(), bottom=0.3 / fig.get_figheight(), wspace=0.04,
                            hspace=0.1)
    for row, index in enumerate(indices):
        first = np.where(mask, maps[..., row], np.nan)
        vmin, vmax = _robust_limits(first)
        handle = None
        for col, fit in enumerate(fits):
            ax = fig.add_subplot(grid[row, col])
            ax.set_facecolor("#303030")
            values = np.where(mask, maps[..., col * len(indices) + row], np.nan)
            handle = _show_slice(ax, values[..., k], box, cmap="magma", vmin=vmin, vmax=vmax)
            if row == 0:
                ax.set_title(fit, fontsize=8)
            if col == 0:
                ax.set_ylabel(index, fontsize=9)
                _label_orientation(ax)
        bar = fig.colorbar(handle, cax=fig.add_subplot(grid[row, -1]))
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{title} (axial slice z = {k})", fontsize=11)
    fig.text(0.01, 0.005, ORIENTATION_NOTE, fontsize=7, color="#444444")
    return _save(fig, out)


STATUS_COLOURS = ("#2b8a3e", "#e8590c", "#c92a2a", "#5f3dc4", "#1971c2", "#e64980", "#868e96", "#f08c00")


def status_figure(out: Path, status: np.ndarray, levels: dict[str, str], mask: np.ndarray, title: str,
                  n_slices: int = 6) -> Path:
    """Per-voxel fit status as categories (legend with voxel counts); voxels outside the mask dark."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    codes = np.where(mask, np.nan_to_num(status, nan=-1), -1).astype(int)
    known = sorted({int(k) for k in levels} | {int(c) for c in np.unique(codes[mask])})
    known = [c for c in known if c >= 0]
    index = {code: i for i, code in enumerate(known)}
    indexed = np.full(codes.shape, np.nan)
    for code, i in index.items():
        indexed[codes == code] = i
    cmap = ListedColormap([STATUS_COLOURS[i % len(STATUS_COLOURS)] for i in range(len(known))])
    slices = axial_slices(mask, n_slices)
    if not slices:
        raise ValueError("the brain mask is empty")
    box = _bounding_box(mask)
    nx, ny = mask[box].shape[:2]
    counts = {code: int(np.sum(codes[mask] == code)) for code in known}
    labels = [f"{c}: {levels.get(str(c), 'unknown')} ({counts[c]} voxels)" for c in known]
    # slices on the left (1.9 in each), the legend to their right in a column as wide as its longest label
    legend_width = 0.6 + 0.055 * max(len(label) for label in labels)
    slices_width = 1.9 * len(slices)
    width = slices_width + legend_width + 0.2
    fig = _new_figure(width, 1.9 * ny / max(nx, 1) + 0.9)
    share = slices_width / width
    for col, k in enumerate(slices):
        ax = fig.add_axes([0.01 + col * share / len(slices), 0.12, share / len(slices) - 0.005, 0.72])
        ax.set_facecolor("#303030")
        _show_slice(ax, indexed[..., k], box, cmap=cmap, vmin=-0.5, vmax=len(known) - 0.5)
        ax.set_title(f"z = {k}", fontsize=8)
        if col == 0:
            _label_orientation(ax)
    handles = [Patch(color=STATUS_COLOURS[index[c] % len(STATUS_COLOURS)], label=label)
               for c, label in zip(known, labels)]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(share + 0.02, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, ORIENTATION_NOTE, fontsize=7, color="#444444")
    return _save(fig, out)


# --------------------------------------------------------------------------------------------- responses
SHELL_COLOURS = ("#1971c2", "#e8590c", "#2b8a3e", "#c92a2a", "#5f3dc4", "#f08c00", "#0b7285")


def shell_colours(n_shells: int) -> list:
    """One colour per shell, all different: the palette's for up to seven shells, else steps of a sequential
    colour map in the shells' order (sub-01 b6kmax has nine b-values; the palette repeated from the eighth)."""
    if n_shells <= len(SHELL_COLOURS):
        return list(SHELL_COLOURS[:n_shells])
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.92, n_shells)]


def response_figure(out: Path, bvalues: np.ndarray, coefficients: np.ndarray, title: str) -> Path:
    """Response amplitude against the angle from the fibre axis per shell, and its glyph (axis vertical).

    The glyph is the response's surface of revolution cut through the fibre axis, each shell
    scaled to its own maximum so that the shapes compare.
    """
    from dwiflow.core.sh import zonal_sh_basis

    angles = np.linspace(0.0, np.pi, 361)
    fig = _new_figure(9.0, 3.8)
    curve_ax = fig.add_axes([0.08, 0.15, 0.5, 0.72])
    glyph_ax = fig.add_axes([0.64, 0.1, 0.34, 0.8])
    colours = shell_colours(len(bvalues))
    for i, (b, row) in enumerate(zip(bvalues, coefficients)):
        lmax = 2 * (len(row) - 1)
        amplitude = zonal_sh_basis(lmax, np.cos(angles)) @ row
        colour = colours[i]
        label = "b = ?" if not np.isfinite(b) else f"b = {b:.0f} s/mm²"
        half = angles <= np.pi / 2
        curve_ax.plot(np.degrees(angles[half]), amplitude[half], color=colour, label=label)
        scale = np.max(np.abs(amplitude)) or 1.0
        radius = np.clip(amplitude, 0, None) / scale
        for sign in (1, -1):
            glyph_ax.plot(sign * radius * np.sin(angles), radius * np.cos(angles), color=colour, lw=1.5)
    curve_ax.set_xlabel("angle from the fibre axis (degrees)")
    curve_ax.set_ylabel("response amplitude")
    curve_ax.set_xlim(0, 90)
    curve_ax.legend(fontsize=8)
    curve_ax.grid(alpha=0.3)
    glyph_ax.axvline(0, color="#999999", lw=0.8, ls="--")
    glyph_ax.set_aspect("equal")
    glyph_ax.set_xlim(-1.1, 1.1)
    glyph_ax.set_ylim(-1.1, 1.1)
    glyph_ax.set_xticks([])
    glyph_ax.set_yticks([])
    glyph_ax.set_title("glyph (fibre axis vertical, per-shell scale)", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, out)


def response_voxels_figure(out: Path, background: np.ndarray, voxels: np.ndarray, mask: np.ndarray, title: str,
                           annotation: str = "", roi: np.ndarray | None = None, n_slices: int = 4) -> Path:
    """The voxels selected for the response (red) over a background slice, on the slices holding most of them.

    ``roi``: DIPY's SSST box as a boolean volume (same voxel order as the images), outlined in yellow;
    ``annotation`` (e.g. the SSST eigenvalues) is printed under the figure.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    labels = None
    if voxels.ndim == 4:  # one volume per tissue (dhollander: CSF, GM, WM), drawn red, green, blue as MRtrix3's
        labels = np.where(voxels.any(axis=-1), np.argmax(voxels, axis=-1) + 1.0, np.nan)
        voxels = voxels.any(axis=-1)
    per_slice = voxels.sum(axis=(0, 1))
    if per_slice.sum() == 0:
        raise ValueError("no voxels were selected for the response")
    slices = sorted(int(k) for k in np.argsort(per_slice)[::-1][:n_slices] if per_slice[k] > 0)
    box = _bounding_box(mask)
    nx, ny = mask[box].shape[:2]
    low, high = _robust_limits(np.where(mask, background, np.nan))
    fig = _new_figure(2.6 * len(slices) + 0.4, 2.6 * ny / max(nx, 1) + 1.2)
    overlay = ListedColormap(["#ff2020"])
    for col, k in enumerate(slices):
        ax = fig.add_axes([0.01 + col / len(slices), 0.2, 1 / len(slices) - 0.02, 0.68])
        _show_slice(ax, background[..., k], box, cmap="gray", vmin=low, vmax=high)
        if labels is None:
            _show_slice(ax, np.where(voxels[..., k], 1.0, np.nan), box, cmap=overlay, vmin=0, vmax=1)
        else:
            _show_slice(ax, labels[..., k], box, cmap=ListedColormap(["#ff2020", "#2fbf4a", "#3b82f6"]), vmin=0.5,
                        vmax=3.5)
        ax.set_title(f"z = {k}: {int(per_slice[k])} voxels", fontsize=8)
        if col == 0:
            _label_orientation(ax)
        if roi is not None and roi[..., k].any():
            xs, ys = np.flatnonzero(roi[..., k].any(axis=1)), np.flatnonzero(roi[..., k].any(axis=0))
            x0, y0 = xs[0] - box[0].indices(mask.shape[0])[0], ys[0] - box[1].indices(mask.shape[1])[0]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1, fill=False,
                                   edgecolor="#ffd43b", lw=1.2))
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.1, annotation, fontsize=8)
    fig.text(0.01, 0.02, ORIENTATION_NOTE, fontsize=7, color="#444444")
    return _save(fig, out)


def tissue_rgb_figure(out: Path, rgb: np.ndarray, mask: np.ndarray, title: str, n_slices: int = 6) -> Path:
    """Axial slices of a tissue-fraction RGB image (CSF red, GM green, WM blue; uint8 or 0–1 values)."""
    slices = axial_slices(mask, n_slices)
    if not slices:
        raise ValueError("the brain mask is empty")
    colours = np.asarray(rgb, dtype=np.float64)
    if colours.max() > 1.0:
        colours = colours / 255.0
    colours = np.where(mask[..., None], np.clip(colours, 0.0, 1.0), 0.19)
    box = _bounding_box(mask)
    nx, ny = mask[box].shape[:2]
    cell = 2.0
    fig = _new_figure(cell * len(slices) + 0.4, cell * ny / max(nx, 1) + 1.0)
    for col, k in enumerate(slices):
        ax = fig.add_axes([0.01 + col / len(slices), 0.16, 1 / len(slices) - 0.02, 0.7])
        ax.imshow(np.transpose(colours[box][..., k, :], (1, 0, 2)), origin="lower", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"z = {k}", fontsize=8)
        if col == 0:
            _label_orientation(ax)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.07, "CSF red, GM green, WM blue (each channel its tissue fraction, 0-1)", fontsize=8)
    fig.text(0.01, 0.01, ORIENTATION_NOTE, fontsize=7, color="#444444")
    return _save(fig, out)


def ssst_roi(reference: Path, parameters: dict[str, Any]) -> np.ndarray | None:
    """DIPY's SSST box (centre and radii in the source voxel order) as a volume in the RAS voxel order of the figures."""
    import nibabel as nib

    from dwiflow.core.response import roi_mask

    source = nib.load(str(reference))
    try:
        box = roi_mask(source.shape[:3], parameters.get("RoiCenter"), parameters.get("RoiRadii", 10))
    except Exception:  # parameters from another source: no box drawn
        return None
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(box.astype(np.uint8), source.affine)).dataobj) > 0


# --------------------------------------------------------------------------------------------- glyphs
def glyph_sphere(frequency: int = 6):
    """The triangulated unit sphere glyphs are drawn on (icosahedral, 10ν²+2 vertices; ν=6: 362, edges ≤ 12.4°)."""
    from dwiflow.core.sphere import geodesic_sphere

    return geodesic_sphere(frequency)


def glyph_radii(sh: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Glyph radius per vertex: the SH amplitude (MRtrix3 basis, world frame), negative lobes clipped to 0.

    ``sh``: (n_voxels, n_coefficients); returns (n_voxels, n_vertices).
    """
    from dwiflow.core.sh import lmax_from_n_coefficients, real_sh_basis

    basis = real_sh_basis(lmax_from_n_coefficients(sh.shape[-1]), vertices)
    return np.clip(sh @ basis.T, 0.0, None)


@dataclass
class GlyphPatch:
    """Geometry of the glyphs of an axial patch, in display units (one voxel = 1, x right, y up).

    ``vertices``: (n_voxels, n_vertices, 3) world-frame glyph points (direction × radius × scale)
    translated to each voxel's centre (i, j, 0); ``voxels``: (n_voxels, 2) the voxel indices in the
    patch; ``scale``: display units per FOD amplitude unit.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colours: np.ndarray
    voxels: np.ndarray
    scale: float


def glyph_patch(sh_slice: np.ndarray, mask_slice: np.ndarray, sphere=None, normalise: str = "patch",
                size: float = 0.48) -> GlyphPatch:
    """Glyph geometry for every masked voxel of a 2D patch of SH coefficients (RAS voxel order).

    ``normalise``: "patch" gives all glyphs one scale (relative sizes kept, as MRtrix3's viewer does; the
    95th percentile of the glyph maxima reaches ``size``), "voxel" scales each glyph to its own maximum
    (DIPY's ``norm=True``).
    """
    sphere = sphere or glyph_sphere()
    ij = np.argwhere(mask_slice & np.all(np.isfinite(sh_slice), axis=-1) & np.any(sh_slice != 0, axis=-1))
    radii = glyph_radii(sh_slice[ij[:, 0], ij[:, 1]], sphere.vertices) if len(ij) else np.zeros((0, sphere.n_vertices))
    if normalise == "voxel":
        peak = radii.max(axis=1, keepdims=True)
        radii = np.divide(radii, peak, out=np.zeros_like(radii), where=peak > 0)
        scale = size
    else:
        # one scale for the patch, set by the 95th percentile of the glyph maxima so that a few outlying
        # voxels do not shrink every other glyph; the largest reaches at most 1.6 × size
        maxima = radii.max(axis=1) if radii.size else np.zeros(1)
        top = max(float(np.percentile(maxima, 95)), float(maxima.max()) / 1.6)
        scale = size / top if top > 0 else 0.0
    points = sphere.vertices[None] * (radii * scale)[..., None]
    points[..., 0] += ij[:, 0, None]
    points[..., 1] += ij[:, 1, None]
    face_directions = np.abs(sphere.vertices[sphere.faces].mean(axis=1))
    colours = face_directions / face_directions.max(axis=1, keepdims=True)
    return GlyphPatch(points, sphere.faces, colours, ij, scale)


def choose_glyph_patch(mask: np.ndarray, score: np.ndarray | None = None, size: int = 14) -> tuple[int, slice, slice]:
    """An axial slice and a size×size voxel window on it: the mask's central slice, the window centred
    on the highest-scoring part (e.g. the number of peaks) of that slice, inside the mask."""
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("the brain mask is empty")
    if score is not None:
        per_slice = np.where(mask, np.nan_to_num(score), 0).sum(axis=(0, 1))
        k = int(slices[np.argmax(per_slice[slices])]) if per_slice[slices].max() > 0 else int(slices[len(slices) // 2])
    else:
        k = int(slices[len(slices) // 2])
    plane = mask[..., k].astype(float)
    weight = plane * (1.0 + (np.nan_to_num(score[..., k]) if score is not None else 0.0))
    from scipy.ndimage import uniform_filter

    smoothed = uniform_filter(weight, size=size, mode="constant")
    ci, cj = np.unravel_index(np.argmax(smoothed), smoothed.shape)
    # the window stays inside the mask's bounding box on this slice (no empty border of background)
    xs, ys = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    windows = []
    for centre, occupied in ((ci, xs), (cj, ys)):
        low, high = int(occupied[0]), int(occupied[-1]) + 1
        width = min(size, high - low)
        start = int(np.clip(centre - width // 2, low, high - width))
        windows.append(slice(start, start + width))
    return k, windows[0], windows[1]


def fod_glyph_figure(out: Path, sh: np.ndarray, mask: np.ndarray, background: np.ndarray, title: str,
                     peaks: np.ndarray | None = None, patch: tuple[int, slice, slice] | None = None,
                     normalise: str = "patch", note: str = "", score: np.ndarray | None = None) -> Path:
    """FOD/ODF glyphs on an axial patch, coloured by direction, with the peaks drawn as lines.

    Left: the whole slice with the patch outlined; right: the patch (saved at high resolution:
    open the image to zoom). Glyphs are the 3D surfaces seen from above (painter's order by height).
    """
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.patches import Rectangle

    if patch is None:
        if peaks is not None:  # favour crossings: the number of peaks, times the given score (e.g. FA)
            count = np.sum(np.isfinite(peaks.reshape(peaks.shape[:3] + (-1, 3))[..., 0]), axis=-1).astype(float)
            score = count if score is None else count * score
        patch = choose_glyph_patch(mask, score)
    k, rows, cols = patch
    geometry = glyph_patch(sh[rows, cols, k], mask[rows, cols, k], normalise=normalise)
    fig = _new_figure(11.0, 6.4)
    overview = fig.add_axes([0.01, 0.1, 0.3, 0.78])
    box = _bounding_box(mask)
    low, high = _robust_limits(np.where(mask, background, np.nan))
    _show_slice(overview, background[..., k], box, cmap="gray", vmin=low, vmax=high)
    offset = (box[0].indices(mask.shape[0])[0], box[1].indices(mask.shape[1])[0])
    overview.add_patch(Rectangle((rows.start - offset[0] - 0.5, cols.start - offset[1] - 0.5), rows.stop - rows.start,
                                 cols.stop - cols.start, fill=False, edgecolor="#ffd43b", lw=1.5))
    overview.set_title(f"axial slice z = {k}", fontsize=9)
    _label_orientation(overview)
    ax = fig.add_axes([0.34, 0.06, 0.62, 0.84])
    ax.set_facecolor("black")
    ax.imshow(background[rows, cols, k].T, origin="lower", cmap="gray", vmin=low, vmax=high * 2.5,
              interpolation="nearest", extent=(-0.5, rows.stop - rows.start - 0.5, -0.5, cols.stop - cols.start - 0.5))
    if len(geometry.voxels):
        triangles = geometry.vertices[:, geometry.faces]  # (voxels, faces, 3 corners, xyz)
        depth = triangles[..., 2].mean(axis=2)
        order = np.argsort(depth, axis=None, kind="stable")
        flat = triangles.reshape(-1, 3, 3)[order]
        colours = np.tile(geometry.colours, (len(geometry.voxels), 1))[order]
        ax.add_collection(PolyCollection(flat[..., :2], facecolors=colours, edgecolors="none", antialiased=False))
    if peaks is not None:
        vectors = peaks[rows, cols, k].reshape(rows.stop - rows.start, cols.stop - cols.start, -1, 3)
        segments = []
        for (i, j) in np.argwhere(mask[rows, cols, k]):
            for v in vectors[i, j]:
                if np.all(np.isfinite(v)):
                    tip = v[:2] * (geometry.scale if normalise == "patch" else 0.48 / max(np.linalg.norm(vectors[i, j][0]), 1e-12))
                    segments.append([(i - tip[0], j - tip[1]), (i + tip[0], j + tip[1])])
        if segments:  # yellow with a black edge: visible over bright glyphs and over the dark background
            from matplotlib import patheffects

            lines = LineCollection(segments, colors="#ffd43b", linewidths=0.8)
            lines.set_path_effects([patheffects.Stroke(linewidth=1.7, foreground="black"), patheffects.Normal()])
            ax.add_collection(lines)
    ax.set_xlim(-0.5, rows.stop - rows.start - 0.5)
    ax.set_ylim(-0.5, cols.stop - cols.start - 0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"voxels x {rows.start}-{rows.stop - 1}, y {cols.start}-{cols.stop - 1} (RAS order), z = {k}"
                 + (" - yellow lines: peaks" if peaks is not None else ""), fontsize=9)
    _label_orientation(ax)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.035, ORIENTATION_NOTE + " " + DIRECTION_COLOUR_NOTE, fontsize=7, color="#444444")
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="#444444")
    return _save(fig, out, dpi=160)


# --------------------------------------------------------------------------------------------- group
def distribution_figure(out: Path, metric: str, values_per_run: dict[str, np.ndarray], units: str = "") -> Path:
    """Histograms (step lines) of one metric within each run's brain mask, all runs on one axis."""
    fig = _new_figure(7.0, 3.4)
    ax = fig.add_axes([0.1, 0.16, 0.62, 0.74])
    pooled = np.concatenate([v[np.isfinite(v)] for v in values_per_run.values()]) if values_per_run else np.zeros(0)
    if pooled.size == 0:
        raise ValueError(f"no finite {metric} values")
    low, high = np.percentile(pooled, [0.5, 99.5])
    bins = np.linspace(low, high if high > low else low + 1, 60)
    for label, values in values_per_run.items():
        finite = values[np.isfinite(values)]
        ax.hist(finite, bins=bins, histtype="step", density=True, label=label, lw=1.2)
    ax.set_xlabel(f"{metric}" + (f" ({units})" if units and units != "arbitrary" else ""))
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"{metric} within each run's brain mask", fontsize=10)
    return _save(fig, out)


# --------------------------------------------------------------------------------------------- the stage
@dataclass
class FigureEntry:
    """One item of a run's figure manifest: a drawn figure or a note saying why it is missing."""

    section: str
    title: str
    file: str = ""
    caption: str = ""
    note: str = ""


class _Manifest:
    def __init__(self, out_dir: Path, entities: dict[str, str]):
        self.out_dir, self.entities = out_dir, entities
        self.entries: list[FigureEntry] = []
        self.warnings: list[str] = []

    def draw(self, section: str, title: str, name: str, caption: str, draw: Callable[[Path], Any]) -> None:
        """Draw one figure; an error becomes a note (and the half-written file is removed)."""
        path = self.out_dir / output_filename("figures_figure", {**self.entities, "desc": name})
        try:
            draw(path)
            self.entries.append(FigureEntry(section, title, path.name, caption))
        except Exception as exc:  # a figure must never fail the run
            path.unlink(missing_ok=True)
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            self.entries.append(FigureEntry(section, title, note=f"not drawn: {last}"))

    def write(self) -> Path:
        return write_manifest(self.out_dir, self.entities, [entry.__dict__ for entry in self.entries], self.warnings)


def write_manifest(out_dir: Path, entities: dict[str, str], figures: list[dict[str, str]], warnings: list[str]) -> Path:
    """A run's figure manifest (figures with titles and captions, or notes; warnings), named by bids_specs."""
    path = Path(out_dir) / output_filename("figures_manifest", entities)
    path.write_text(json.dumps({"figures": figures, "warnings": warnings}, indent=2) + "\n")
    return path


def figures_stage(staged_dir: str | Path, out_dir: str | Path, files: dict[str, str], entities: dict[str, str],
                  naming: dict[str, str] | None = None) -> Path:
    """Draw every figure a run's staged derivatives allow; returns the manifest (JSON) path.

    ``files`` maps output keys (``tensor_fa``, ``csd_fod``, ``response``, ``peaks`` …) to file names
    inside ``staged_dir``; ``naming`` holds the run's ``fod_model`` (whose section gets the peaks and
    the FOD metrics) and response ``method``. What is drawn comes from data: each output's
    ``figure`` hint in ``bids_specs/outputs.yaml`` (a mosaic panel, FOD glyphs, possibly ``in_place_of``
    another output's, or a named drawing) and ``figure_panels``; sections follow the stage registry's
    order, and every ``status`` output gets a status map. Outputs absent from ``files`` get no figures;
    a figure that cannot be drawn becomes a note in the manifest.
    """
    from dwiflow.bids_specs.outputs import figure_panels, output_spec
    from dwiflow.tasks.registry import stage_titles

    naming = dict(naming or {})
    fod_model = naming.get("fod_model", "csd")
    staged, out = Path(staged_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest(out, entities)
    path_of = {key: staged / name for key, name in files.items() if (staged / name).is_file()}
    cache: dict[str, CanonicalImage] = {}

    def image(key: str) -> np.ndarray:
        if key not in cache:
            cache[key] = load_canonical(path_of[key])
        return cache[key].data

    def sidecar_of(key: str) -> dict[str, Any]:
        side = path_of[key].with_name(path_of[key].name.split(".")[0] + ".json")
        return json.loads(side.read_text()) if side.is_file() else {}

    try:
        mask = image("mask") > 0
    except Exception as exc:
        manifest.entries.append(FigureEntry("tensor", "Brain mask", note=f"no figures: the brain mask cannot be read ({exc})"))
        return manifest.write()
    if not mask.any():
        manifest.warnings.append("the brain mask is empty")
    for key in path_of:  # what the stages found the data could not support (sidecar "Warnings")
        for note in sidecar_of(key).get("Warnings", []):
            if note not in manifest.warnings:
                manifest.warnings.append(note)
    background_key = next((k for k in ("tensor_s0", "tensor_fa") if k in path_of), None)

    def background() -> np.ndarray:
        return image(background_key) if background_key else mask.astype(np.float32)

    hints = {key: output_spec(key).get("figure") or {} for key in path_of}
    titles = stage_titles()
    section_of = {key: next((s for s in sorted(titles, key=len, reverse=True) if key == s or key.startswith(s + "_")),
                            key) for key in path_of}
    glyph_label = {section_of[k]: h["glyphs"] for k, h in hints.items() if "glyphs" in h and h.get("peaks", True)}
    # a FOD drawn in place of another (the normalised WM FOD for the deconvolution's): one panel, the peaks' FOD
    replaced = {h["in_place_of"].format(**naming) for k, h in hints.items() if "glyphs" in h and "in_place_of" in h}

    def mosaic(panel: str, spec: dict[str, Any]) -> None:
        keys = [k for k, h in hints.items() if h.get("panel") == panel]
        if not keys:
            return
        title = spec["title"].format(fod_label=glyph_label.get(fod_model, fod_model))

        def draw(path: Path) -> None:
            panels = []
            for key in keys:
                data, hint = image(key), hints[key]
                units = sidecar_of(key).get("Units", "")
                limits = tuple(hint["range"]) if "range" in hint else (None, None)
                for v in range(data.shape[3] if data.ndim == 4 else 1):
                    volume = data[..., v] if data.ndim == 4 else data
                    label = hint["label"] if data.ndim == 3 else f"{hint['label']} [{v}]"
                    panels.append(MapPanel(label, volume, units, hint.get("cmap", "gray"), *limits))
            mosaic_figure(path, panels, mask, title)

        name = spec.get("name", panel).format(**{**naming, "fod_model": fod_model})
        manifest.draw(spec["section"].format(fod_model=fod_model), title, name, spec["caption"], draw)

    def status(key: str, label: str) -> None:
        levels = {str(k): str(v) for k, v in sidecar_of(key).get("Levels", {}).items()}
        codes = image(key)
        failed = int(np.sum((np.nan_to_num(codes) != 0) & mask))
        if failed:
            manifest.warnings.append(f"{label}: {failed} of {int(mask.sum())} mask voxels did not fit cleanly "
                                     "(see the status map)")
        manifest.draw(section_of[key], f"{label} status", key.replace("_", ""),
                      "Per-voxel fit status: where fits failed, and why.",
                      lambda path: status_figure(path, codes, levels, mask, f"{label}: per-voxel status"))

    chosen_patch: list[tuple[int, slice, slice]] = []

    def run_patch() -> tuple[int, slice, slice]:
        """The glyph patch of the run, chosen once from the data (the number of peaks times FA: crossings in
        white matter), so that every model's glyphs show the same voxels."""
        if not chosen_patch:
            score = image("tensor_fa") if "tensor_fa" in path_of else None
            if "peaks" in path_of:
                peaks = image("peaks")
                count = np.sum(np.isfinite(peaks.reshape(peaks.shape[:3] + (-1, 3))[..., 0]), axis=-1).astype(float)
                score = count if score is None else count * score
            chosen_patch.append(choose_glyph_patch(mask, score))
        return chosen_patch[0]

    def glyphs(key: str, hint: dict[str, Any]) -> None:
        section = section_of[key]
        with_peaks = hint.get("peaks", True) and section == fod_model and "peaks" in path_of
        peaks = image("peaks") if with_peaks else None
        manifest.draw(section, hint["glyphs"], hint["name"], hint.get("caption", ""),
                      lambda path: fod_glyph_figure(path, in_mrtrix3_basis(image(key), sidecar_of(key), path_of[key]),
                                                    mask, background(), hint["glyphs"], peaks=peaks,
                                                    patch=run_patch(), normalise=hint.get("normalise", "patch")))

    def drawing(key: str, kind: str) -> None:
        if kind == "response":
            from dwiflow.core.response import ResponseFunction

            response = ResponseFunction.from_text(path_of[key].read_text(), str(path_of[key]))
            meta = sidecar_of(key)
            method = naming.get("method") or "response"
            tissue = key.split("_", 1)[1].upper() if key != "response" else ""  # dhollander: one per tissue
            manifest.draw("response", f"Response function {tissue}".strip(), f"response{tissue.lower()}",
                          f"Response ({meta.get('Method', method)}): amplitude against the angle from the fibre "
                          "axis for each shell, and the glyph (fibre axis vertical)."
                          + (" Isotropic: one amplitude per shell." if tissue in ("GM", "CSF") else ""),
                          lambda path: response_figure(path, response.bvalues, response.coefficients,
                                                       f"Response function ({method} {tissue})".replace(" )", ")")))
        elif kind == "response_voxels":
            voxels = image(key) > 0
            method = naming.get("method", "")
            meta = sidecar_of("response") if "response" in path_of else {}
            roi = None
            if "Eigenvalues" in meta:
                ev = meta["Eigenvalues"]
                annotation = (f"SSST: eigenvalues {ev[0]:.3g}, {ev[1]:.3g}, {ev[2]:.3g} mm²/s; S0 "
                              f"{meta.get('S0', float('nan')):.4g}; {meta.get('VoxelCount', int(voxels.sum()))} voxels "
                              f"with FA > {meta.get('Parameters', {}).get('FaThreshold', '?')} in the central box "
                              "(yellow)")
                roi = ssst_roi(path_of["mask"], meta.get("Parameters", {}))
            elif voxels.ndim == 4:
                counts = voxels.reshape(-1, voxels.shape[-1]).sum(axis=0)
                annotation = (f"{method}: CSF {counts[0]} (red), GM {counts[1]} (green), WM {counts[2]} (blue) "
                              "voxels")
            else:
                annotation = f"{int(voxels.sum())} voxels selected by {method}"
            manifest.draw("response", "Response voxels", "responsevoxels",
                          ("Voxels selected for each tissue's response (CSF red, GM green, WM blue)" if voxels.ndim == 4
                           else "Voxels selected for the response (red)")
                          + " over the b=0 image (fitted S0), on the slices that hold most of them.",
                          lambda path: response_voxels_figure(path, background(), voxels, mask,
                                                              f"Voxels selected for the {method} response",
                                                              annotation, roi))
        elif kind == "tissue_rgb":
            manifest.draw(section_of[key], "Tissue fractions (RGB)", "tissuergb",
                          "Each voxel's tissue fractions after normalisation as one colour: CSF red, GM green, WM "
                          "blue (MRtrix3's tissue-fraction rendering).",
                          lambda path: tissue_rgb_figure(path, image(key), mask, "Tissue fractions (RGB)"))
        elif kind == "mapmri_compare":
            compare = (sidecar_of(key).get("Model", {}).get("Parameters", {}) or {}).get("Compare", {})
            manifest.draw(section_of[key], "MAP-MRI fits compared", "mapmricompare",
                          "The indices of this run's fit and of the compared MAP-MRI variants side by side (one colour "
                          "scale per index, set by this run's fit), as DIPY's MAP-MRI tutorial compares MAPL, CMAP, "
                          "CMAPL and MAP+.",
                          lambda path: comparison_figure(path, image(key), compare["Fits"], compare["Indices"], mask,
                                                         "MAP-MRI fits compared"))
        else:
            raise ValueError(f"unknown figure drawing {kind!r} for {key}")

    panels = figure_panels()
    for section in titles:  # in run order: glyphs, mosaics, drawings, the FOD metrics, the status map
        keys = [k for k in path_of if section_of[k] == section]
        for key in keys:
            if "glyphs" in hints[key] and key not in replaced:
                glyphs(key, hints[key])
        for panel, spec in panels.items():
            if spec["section"] == section and panel in {hints[k].get("panel") for k in keys}:
                mosaic(panel, spec)
        for key in keys:
            if "draw" in hints[key]:
                drawing(key, hints[key]["draw"])
        if section == fod_model:
            for panel, spec in panels.items():
                if spec["section"] == "{fod_model}":
                    mosaic(panel, spec)
        for key in keys:
            if key.endswith("_status"):
                status(key, titles[section].split(" (")[0])
    return manifest.write()
