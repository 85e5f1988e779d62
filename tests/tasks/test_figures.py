"""QC figures: glyph geometry in the display frame, mosaics, notes instead of failures."""

import json

import nibabel as nib
import numpy as np

from dwiflow.core.sh import real_sh_basis
from dwiflow.tasks.figures import figures_stage, glyph_patch, glyph_sphere, load_canonical


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _lobe_tips(geometry, voxel_index, sphere, min_fraction=0.3):
    """Directions (display/world frame) of the local maxima of one drawn glyph's radius."""
    centre = np.array([*geometry.voxels[voxel_index], 0.0])
    offsets = geometry.vertices[voxel_index] - centre
    radius = np.linalg.norm(offsets, axis=1)
    neighbour_max = np.zeros_like(radius)
    for a, b in sphere.edges:
        neighbour_max[a] = max(neighbour_max[a], radius[b])
        neighbour_max[b] = max(neighbour_max[b], radius[a])
    tips = np.flatnonzero((radius >= neighbour_max) & (radius > min_fraction * radius.max()))
    return offsets[tips] / radius[tips, None]


def _mesh_spacing(sphere):
    """The largest angle (degrees) between neighbouring vertices: how far a drawn tip can sit from a true peak."""
    v, e = sphere.vertices, sphere.edges
    return float(np.degrees(np.arccos(np.clip(np.sum(v[e[:, 0]] * v[e[:, 1]], axis=1), -1, 1))).max())


def _angle_to(tips, direction):
    return float(np.degrees(np.arccos(np.clip(np.max(np.abs(tips @ direction)), 0, 1))))


def test_glyph_lobes_point_along_the_fibres_in_a_flipped_image(tmp_path):
    """An LAS image (x flipped): the crossing on the subject's right is drawn on the right, lobes along the fibres."""
    fibre_a, fibre_b, fibre_c = _unit([1.0, 0.35, 0.2]), _unit([-0.25, 1.0, 0.15]), _unit([0.6, -0.5, 0.62])
    sharp = lambda u: real_sh_basis(8, u[None])[0]  # truncated delta: lobes along u
    sh = np.zeros((4, 3, 2, 45))
    sh[0, 1, 1] = sharp(fibre_a) + sharp(fibre_b)  # voxel i=0: largest world x in LAS = subject's right
    sh[3, 1, 1] = sharp(fibre_c)
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [3.0, -2.0, -2.0]
    path = tmp_path / "fod.nii.gz"
    nib.save(nib.Nifti1Image(sh.astype(np.float32), affine), str(path))

    view = load_canonical(path)
    assert view.affine[0, 0] > 0  # reoriented to RAS
    mask = np.any(view.data != 0, axis=-1)
    sphere = glyph_sphere()
    geometry = glyph_patch(view.data[:, :, 1], mask[:, :, 1], sphere)
    drawn = {tuple(v) for v in geometry.voxels}
    assert drawn == {(3, 1), (0, 1)}  # the crossing is drawn at the right edge (display x = 3)
    crossing = next(i for i, v in enumerate(geometry.voxels) if v[0] == 3)
    single = next(i for i, v in enumerate(geometry.voxels) if v[0] == 0)
    tips = _lobe_tips(geometry, crossing, sphere)
    # a tip is a mesh vertex: within ~0.6 of the mesh spacing of the true direction; a flipped axis would put
    # these fibres 40 degrees or more away
    tolerance = 0.7 * _mesh_spacing(sphere)
    assert _angle_to(tips, fibre_a) < tolerance and _angle_to(tips, fibre_b) < tolerance
    assert len(tips) == 4  # two lobes, each with its antipode, nothing else
    tips_c = _lobe_tips(geometry, single, sphere)
    assert len(tips_c) == 2 and _angle_to(tips_c, fibre_c) < tolerance
    # one scale for the patch: the glyphs keep their relative size, the largest stays within 1.6 × 0.48 voxel
    offsets = geometry.vertices - np.concatenate([geometry.voxels, np.zeros((2, 1))], axis=1)[:, None]
    reach = np.linalg.norm(offsets, axis=-1).max(axis=1)
    amplitude = [np.abs(view.data[3, 1, 1] @ real_sh_basis(8, sphere.vertices).T).max(),
                 np.abs(view.data[0, 1, 1] @ real_sh_basis(8, sphere.vertices).T).max()]
    assert 0.48 <= reach.max() <= 0.77 and np.isclose(reach[crossing] / reach[single], amplitude[0] / amplitude[1])


def test_glyphs_of_a_csd_phantom_follow_the_true_crossings(tmp_path):
    """CSD on the two-fibre phantom: every drawn crossing glyph has lobes along both true fibres."""
    from dwiflow.cli.dwirecon import main as dwirecon

    bids = tmp_path / "bids"
    assert dwirecon(["phantom", str(bids), "--shape", "8,8,3", "--scheme", "multi", "--snr", "50", "--seed", "4"]) == 0
    dwi = bids / "sub-phantom" / "dwi" / "sub-phantom_dwi"
    truth_dir = bids / "derivatives" / "truth" / "sub-phantom" / "dwi"
    fod, response = tmp_path / "fod.nii.gz", tmp_path / "response.txt"
    mask = bids / "derivatives" / "masks" / "sub-phantom" / "dwi" / "sub-phantom_desc-brain_mask.nii.gz"
    inputs = [f"{dwi}.nii.gz", f"{dwi}.bval", f"{dwi}.bvec"]
    assert dwirecon(["response", "fa", *inputs, str(response), "--mask", str(mask), "--number", "40", "--erode", "0"]) == 0
    assert dwirecon(["csd", *inputs, str(response), str(fod), "--mask", str(mask)]) == 0
    view = load_canonical(fod)
    n_true = load_canonical(truth_dir / "sub-phantom_desc-nfibres_truth.nii.gz").data.astype(int)
    truth = load_canonical(truth_dir / "sub-phantom_desc-directions_truth.nii.gz").data
    truth = truth.reshape(truth.shape[:3] + (-1, 3))
    sphere = glyph_sphere()
    errors = []
    for k in range(view.data.shape[2]):
        mask = n_true[..., k] == 2
        if not mask.any():
            continue
        geometry = glyph_patch(view.data[:, :, k], mask, sphere)
        for index, (i, j) in enumerate(geometry.voxels):
            tips = _lobe_tips(geometry, index, sphere, min_fraction=0.25)
            errors.append(max(_angle_to(tips, _unit(truth[i, j, k, f])) for f in range(2)))
    errors = np.array(errors)
    assert errors.size > 20
    # CSD resolves most crossings of this phantom; the drawn lobes must sit on both fibres there
    spacing = _mesh_spacing(sphere)
    assert np.median(errors) < 0.7 * spacing and np.mean(errors < 1.2 * spacing) > 0.8


def test_a_figure_that_cannot_be_drawn_becomes_a_note(tmp_path):
    """A broken map gives a note in the manifest; the other figures are drawn and the stage does not raise."""
    staged = tmp_path / "staged"
    staged.mkdir()
    mask = np.zeros((10, 10, 4), dtype=np.uint8)
    mask[2:8, 2:8, 1:3] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(staged / "m.nii.gz"))
    fa = np.where(mask, 0.5, 0).astype(np.float32) + np.linspace(0, 0.2, 10)[:, None, None].astype(np.float32)
    nib.save(nib.Nifti1Image(fa, np.eye(4)), str(staged / "fa.nii.gz"))
    (staged / "fwm.nii.gz").write_bytes(b"not a nifti")
    files = {"mask": "m.nii.gz", "tensor_fa": "fa.nii.gz", "rumba_fwm": "fwm.nii.gz", "smt_lpar": "absent.nii.gz"}
    manifest = json.loads(figures_stage(staged, tmp_path / "fig", files, {"sub": "x"}).read_text())
    entries = {e["title"]: e for e in manifest["figures"]}
    assert entries["Tensor: FA and MD"]["file"] and (tmp_path / "fig" / entries["Tensor: FA and MD"]["file"]).is_file()
    assert not entries["RUMBA-SD volume fractions"]["file"]
    assert entries["RUMBA-SD volume fractions"]["note"].startswith("not drawn:")
    assert not any(e["section"] == "smt" for e in manifest["figures"])  # SMT did not run: no panel at all
    assert not list((tmp_path / "fig").glob("*.partial*"))


def _captured(monkeypatch):
    """Replace the figure writer by one that keeps the figure (drawn) for inspection."""
    import dwiflow.tasks.figures as figures

    kept = []

    def keep(fig, out, dpi=110):
        fig.canvas.draw()
        kept.append(fig)
        return out

    monkeypatch.setattr(figures, "_save", keep)
    return kept


def _inside(inner, outer, slack=1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.x1 <= outer.x1 + slack and inner.y0 >= outer.y0 - slack
            and inner.y1 <= outer.y1 + slack)


def test_status_legend_beside_the_slices_and_labels_inside_the_figure(tmp_path, monkeypatch):
    """Two-slice data: the status legend does not cover a slice; every mosaic's colour-bar label and range note
    lie inside the figure; the colour range is stated (1st-99th percentile, or fixed)."""
    from dwiflow.tasks.figures import MapPanel, mosaic_figure, status_figure

    kept = _captured(monkeypatch)
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 48, 2), bool)
    mask[5:35, 6:44] = True
    status = np.where(rng.random(mask.shape) < 0.05, 7, 0)
    levels = {"0": "ok", "1": "non-finite input signal", "7": "diffusion-weighted signal above the b=0 signal on "
              "average (non-physical)", "8": "non-physical estimate (a negative return-to-origin, -axis or -plane "
              "probability or mean squared displacement)"}
    status_figure(tmp_path / "s.png", status, levels, mask, "status")
    fig = kept[-1]
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    whole = fig.bbox
    assert _inside(legend, whole)
    for ax in fig.axes:
        assert not ax.get_window_extent(renderer).overlaps(legend)
    md = rng.normal(1e-3, 2e-4, mask.shape)
    md[0, 0, 0] = 50.0  # one outlier does not set the scale
    mosaic_figure(tmp_path / "m.png", [MapPanel("MD", md, "mm^2/s", "viridis"),
                                       MapPanel("FA", rng.random(mask.shape), "", "gray", 0.0, 1.0)], mask, "maps")
    fig = kept[-1]
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in (ax.yaxis.label, *ax.get_yticklabels()) if t.get_text()]
    texts += [t for t in fig.texts if t.get_text()]
    assert texts and all(_inside(t.get_window_extent(renderer), fig.bbox) for t in texts)
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "MD: " in notes and "(1st to 99th percentile in the mask)" in notes and "FA: 0 to 1 (fixed)" in notes
    low, high = (float(v) for v in notes.split("MD: ")[1].split(" mm^2/s")[0].split(" to "))
    assert 4e-4 < low < 8e-4 and 1.2e-3 < high < 1.6e-3


def test_every_model_of_a_run_draws_its_glyphs_on_the_same_patch(tmp_path, monkeypatch):
    """CSD, RUMBA-SD and MAP-MRI glyphs of one run are drawn on one patch, chosen once from the run's data (peaks
    × FA), not per model; the peaks go to the FOD source's figure only."""
    import dwiflow.tasks.figures as figures

    calls = []

    def record(path, sh, mask, background, title, peaks=None, patch=None, **kwargs):
        calls.append((title, patch, peaks is not None))
        return path

    monkeypatch.setattr(figures, "fod_glyph_figure", record)
    staged = tmp_path / "staged"
    staged.mkdir()
    rng = np.random.default_rng(1)
    shape = (24, 24, 3)
    mask = np.zeros(shape, np.uint8)
    mask[2:22, 2:22] = 1
    save = lambda name, data: nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), str(staged / name))  # noqa: E731
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(staged / "m.nii.gz"))
    save("fa.nii.gz", rng.random(shape) * mask)
    for name in ("csd.nii.gz", "rumba.nii.gz", "mapmri.nii.gz"):
        save(name, rng.normal(size=shape + (45,)))  # each model's own FOD: a per-model choice would differ
    peaks = np.full(shape + (9,), np.nan)
    peaks[15:20, 4:9, 1, :6] = 1.0  # two peaks in one corner: where crossings are
    save("peaks.nii.gz", peaks)
    files = {"mask": "m.nii.gz", "tensor_fa": "fa.nii.gz", "csd_fod": "csd.nii.gz", "rumba_fod": "rumba.nii.gz",
             "mapmri_odf": "mapmri.nii.gz", "peaks": "peaks.nii.gz"}
    figures.figures_stage(staged, tmp_path / "fig", files, {"sub": "x"}, {"fod_model": "csd"})
    assert len(calls) == 3
    patches = {(patch[0], patch[1].start, patch[1].stop, patch[2].start, patch[2].stop) for _, patch, _ in calls}
    assert len(patches) == 1
    k, rows, cols = calls[0][1]
    assert k == 1 and rows.start <= 15 and rows.stop >= 20 and cols.start <= 4 and cols.stop >= 9
    assert [title for title, _, with_peaks in calls if with_peaks] == ["CSD fibre ODF"]


def test_the_normalised_wm_fod_is_drawn_with_the_peaks_in_place_of_the_deconvolutions(tmp_path, monkeypatch):
    """msmt/ss3t specs: the peaks come from mtnormalise's WM FOD, so its glyphs are drawn, with the peaks, in place
    of the deconvolution's FOD (which differs from it by the smooth field only): one glyph panel, showing peaks."""
    import dwiflow.tasks.figures as figures

    calls = []

    def record(path, sh, mask, background, title, peaks=None, patch=None, **kwargs):
        calls.append((title, peaks is not None, float(sh[mask > 0][:, 0].mean())))
        return path

    monkeypatch.setattr(figures, "fod_glyph_figure", record)
    staged = tmp_path / "staged"
    staged.mkdir()
    shape = (12, 12, 2)
    mask = np.ones(shape, np.uint8)
    save = lambda name, data: nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), str(staged / name))  # noqa: E731
    save("m.nii.gz", mask)
    for name, value in (("wm.nii.gz", 1.0), ("wmnorm.nii.gz", 2.0)):
        fod = np.zeros(shape + (45,))
        fod[..., 0] = value
        save(name, fod)
    peaks = np.full(shape + (9,), np.nan)
    peaks[..., :3] = [1.0, 0.0, 0.0]
    save("peaks.nii.gz", peaks)
    for deconvolution in ("msmt_csd", "ss3t_csd"):
        calls.clear()
        files = {"mask": "m.nii.gz", f"{deconvolution}_wm": "wm.nii.gz", "mtnormalise_wm": "wmnorm.nii.gz",
                 "peaks": "peaks.nii.gz"}
        figures.figures_stage(staged, tmp_path / deconvolution, files, {"sub": "x"},
                              {"fod_model": "mtnormalise", "tissue_model": deconvolution})
        assert [(title, with_peaks) for title, with_peaks, _ in calls] == [("Normalised white-matter FOD", True)]
        assert np.isclose(calls[0][2], 2.0)  # the normalised image, not the deconvolution's
    # without mtnormalise the deconvolution's FOD is drawn, with the peaks when they come from it
    calls.clear()
    figures.figures_stage(staged, tmp_path / "plain", {"mask": "m.nii.gz", "msmt_csd_wm": "wm.nii.gz",
                                                       "peaks": "peaks.nii.gz"}, {"sub": "x"},
                          {"fod_model": "msmt_csd", "tissue_model": "msmt_csd"})
    assert [(title, with_peaks) for title, with_peaks, _ in calls] == [("MSMT-CSD white-matter FOD", True)]


def test_every_shell_of_a_response_has_its_own_colour(tmp_path, monkeypatch):
    """A response of sub-01 b6kmax's nine b-values: nine curves in nine colours, in the legend's order (a seven-colour
    palette drew b=750 and b=6000 alike); four shells keep the palette."""
    from matplotlib.colors import to_hex

    from dwiflow.tasks.figures import SHELL_COLOURS, response_figure

    kept = _captured(monkeypatch)
    for bvalues in (np.array([0, 750, 1500, 2250, 3000, 3750, 4500, 5200, 6000.0]), np.array([0, 1000, 2000, 3000.0])):
        coefficients = np.outer(np.exp(-bvalues / 3000), [1.0, -0.3, 0.1])
        response_figure(tmp_path / "r.png", bvalues, coefficients, "response")
        curves = kept[-1].axes[0]
        colours = [to_hex(line.get_color()) for line in curves.get_lines()]
        assert len(colours) == len(bvalues) == len(set(colours)), colours
        assert [t.get_text() for t in curves.get_legend().get_texts()] == [f"b = {b:.0f} s/mm²" for b in bvalues]
    assert colours == list(SHELL_COLOURS[:4])


def test_no_figure_text_is_cut_off_on_a_thin_volume(tmp_path, monkeypatch):
    """Every line of text drawn on the figure (titles, notes, annotations) lies inside it, for volumes of one and
    two slices (the tissue-fraction figure of a two-slice run cut its orientation note off at the right)."""
    import matplotlib

    from dwiflow.tasks import figures

    matplotlib.use("Agg")
    saved = []
    original = figures._save

    def checked_save(fig, out, dpi=110):
        written = original(fig, out, dpi)  # as drawn into the file
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        for text in [*fig.texts, *([fig._suptitle] if fig._suptitle is not None else [])]:
            if not text.get_text():
                continue
            box = text.get_window_extent(renderer)
            assert box.x0 >= -1 and box.x1 <= width + 1 and box.y0 >= -1 and box.y1 <= height + 1, \
                (out.name, text.get_text(), box.x1, width)
        saved.append(out.name)
        return written

    monkeypatch.setattr(figures, "_save", checked_save)
    rng = np.random.default_rng(0)
    for depth in (1, 2):
        mask = np.zeros((30, 36, depth), dtype=bool)
        mask[4:26, 5:31] = True
        rgb = rng.random((30, 36, depth, 3))
        figures.tissue_rgb_figure(tmp_path / f"rgb{depth}.png", rgb, mask, "Tissue fractions (RGB)")
        voxels = np.zeros((30, 36, depth, 3), dtype=bool)
        voxels[10:12, 10:12] = True
        figures.response_voxels_figure(tmp_path / f"vox{depth}.png", rng.random((30, 36, depth)), voxels, mask,
                                       "Voxels selected for the dhollander response",
                                       "dhollander: CSF 4 (red), GM 4 (green), WM 4 (blue) voxels")
        figures.mosaic_figure(tmp_path / f"map{depth}.png", [figures.MapPanel("FA", rng.random((30, 36, depth)))],
                              mask, "Tensor: FA")
        figures.status_figure(tmp_path / f"status{depth}.png", np.zeros((30, 36, depth), dtype=np.uint8),
                              {"0": "ok", "1": "non-finite input signal"}, mask, "Tensor: per-voxel status")
    assert len(saved) == 8
