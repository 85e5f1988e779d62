"""``dwirecon fixels`` against MRtrix3 3.0.3's ``fod2fixel`` on the same FOD: per-voxel fixel counts, directions,
AFD and peak amplitudes; MRtrix3's ``fixel2voxel`` and ``fixelcrop`` read our fixel directory; bad input."""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from tests.conftest import run_mrtrix


@pytest.fixture(scope="module")
def fod(sub01_csd_fod):
    """sub-01 b1kb2k's CSD FOD and its mask (tests/conftest.py)."""
    return sub01_csd_fod


def fixel_data(path):
    """A fixel data file as MRtrix3 reads it: an axis whose transform points backwards is reversed."""
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float64)
    for axis in range(2):
        column = img.affine[:3, axis]
        if column[np.argmax(np.abs(column))] < 0:
            data = np.flip(data, axis)
    return data


def index_on_grid(path, reference_affine, shape):
    """(count, offset) per voxel of ``shape`` (a fixel index read onto the FOD's voxel grid)."""
    img = nib.load(path)
    grid = np.indices(shape).reshape(3, -1)
    ijk = np.rint((np.linalg.inv(img.affine) @ reference_affine @ np.vstack([grid, np.ones(grid.shape[1])]))[:3])
    ijk = ijk.astype(int)
    return np.asarray(img.dataobj)[ijk[0], ijk[1], ijk[2]].reshape(shape + (2,)).astype(np.int64)


OPTION_SETS = {
    "defaults": ([], []),
    "peak 0.2, maxnum 2, dirpeak": (["--fmls-peak-value", "0.2", "--maxnum", "2", "--dirpeak"],
                                   ["-fmls_peak_value", "0.2", "-maxnum", "2", "-dirpeak"]),
    "integral 0.05": (["--fmls-integral", "0.05"], ["-fmls_integral", "0.05"]),
    "no thresholds": (["--fmls-no-thresholds"], ["-fmls_no_thresholds"]),
}


@pytest.mark.mrtrix
@pytest.mark.parametrize("label", list(OPTION_SETS))
def test_fixels_equal_fod2fixel(fod, tmp_path, mrtrix, label, record):
    fod_path, mask_path = fod
    ours_args, theirs_args = OPTION_SETS[label]
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    assert main(["fixels", str(fod_path), str(ours_dir), "--mask", str(mask_path), "--afd", "--peak-amp", "--disp",
                 "-q", *ours_args]) == 0
    run_mrtrix("fod2fixel", fod_path, theirs_dir, "-mask", mask_path, "-afd", "afd.nii", "-peak_amp",
               "peak_amp.nii", "-nii", "-nthreads", "1", *theirs_args)
    img = nib.load(fod_path)
    shape = img.shape[:3]
    ours = index_on_grid(ours_dir / "index.nii.gz", img.affine, shape)
    theirs = index_on_grid(theirs_dir / "index.nii", img.affine, shape)
    mask = nib.load(mask_path).get_fdata() > 0
    same_count = np.mean(ours[mask][:, 0] == theirs[mask][:, 0])
    data = {name: (fixel_data(ours_dir / f"{name}.nii.gz"), fixel_data(theirs_dir / f"{name}.nii"))
            for name in ("directions", "afd", "peak_amp")}
    angles, afd_err, peak_err = [], [], []
    for voxel in np.argwhere(mask & (ours[..., 0] == theirs[..., 0]) & (ours[..., 0] > 0)):
        (n, a), (_, b) = ours[tuple(voxel)], theirs[tuple(voxel)]
        d_o, d_t = data["directions"][0][a:a + n, :, 0], data["directions"][1][b:b + n, :, 0]
        angles.append(np.degrees(np.arccos(np.clip(np.abs(np.sum(d_o * d_t, axis=1)), 0, 1))))
        afd_err.append(np.abs(data["afd"][0][a:a + n, 0, 0] / data["afd"][1][b:b + n, 0, 0] - 1))
        peak_err.append(np.abs(data["peak_amp"][0][a:a + n, 0, 0] / data["peak_amp"][1][b:b + n, 0, 0] - 1))
    angles, afd_err, peak_err = map(np.concatenate, (angles, afd_err, peak_err))
    print(f"{label}: {theirs[mask][:, 0].sum()} fixels; counts identical in {same_count:.4f} of {mask.sum()} voxels; "
          f"direction max {angles.max():.3g} deg, AFD max rel {afd_err.max():.2g}, peak max rel {peak_err.max():.2g}")
    record("fixels", f"voxels with fod2fixel's fixel count ({label}, sub-01)", same_count, ">= 0.99",
           "MRtrix3 3.0.3 fod2fixel")
    record("fixels", f"fraction of fixels with AFD within 1e-4 ({label})", np.mean(afd_err <= 1e-4), ">= 0.999",
           "MRtrix3 3.0.3 fod2fixel")
    assert theirs[mask][:, 0].sum() > 1000
    assert same_count >= 0.99
    assert np.mean(angles < 1.0) >= 0.999
    assert np.mean(afd_err <= 1e-4) >= 0.999 and np.mean(peak_err <= 1e-4) >= 0.999


@pytest.mark.mrtrix
def test_mrtrix3_commands_read_our_fixel_directory(fod, tmp_path, mrtrix):
    fod_path, mask_path = fod
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    assert main(["fixels", str(fod_path), str(ours_dir), "--mask", str(mask_path), "--afd", "-q"]) == 0
    run_mrtrix("fod2fixel", fod_path, theirs_dir, "-mask", mask_path, "-afd", "afd.nii", "-nii")
    for directory, afd in ((ours_dir, "afd.nii.gz"), (theirs_dir, "afd.nii")):
        run_mrtrix("fixel2voxel", directory / afd, "sum", tmp_path / f"{directory.name}_sum.nii")
        run_mrtrix("fixel2voxel", directory / afd, "count", tmp_path / f"{directory.name}_count.nii")
    ours_sum, theirs_sum = (nib.load(tmp_path / f"{n}_sum.nii").get_fdata() for n in ("ours", "theirs"))
    ours_count, theirs_count = (nib.load(tmp_path / f"{n}_count.nii").get_fdata() for n in ("ours", "theirs"))
    assert np.mean(ours_count == theirs_count) >= 0.99
    assert np.abs(ours_sum - theirs_sum).max() <= 1e-4 * theirs_sum.max()
    # fixelcrop keeps the fixels a per-fixel mask selects: our directory in, a valid directory out
    n_fixels = int(ours_count.sum())
    keep = (np.arange(n_fixels) % 3 == 0).astype(np.float32)[:, None, None]
    nib.save(nib.Nifti1Image(keep, np.eye(4)), ours_dir / "keep.nii")
    run_mrtrix("fixelcrop", ours_dir, ours_dir / "keep.nii", tmp_path / "cropped")
    cropped = next((tmp_path / "cropped").glob("afd.*"))
    size = subprocess.run(["mrinfo", "-size", str(cropped)], capture_output=True, text=True, check=True).stdout
    assert int(size.split()[0]) == int(keep.sum())


def test_lobe_merge_ratio_merges_lobes(fod):
    """MRtrix3 3.0.3 cannot be compared here: load_fmls_thresholds() looks the option up as "fmls_merge_ratio", not
    under its declared name "fmls_lobe_merge_ratio", so fod2fixel ignores it. Merging lowers the count of lobes (each
    merge joins two) but keeps their total integral, and a ratio of 1 merges nothing."""
    from dwiflow.core.fixels import segment_fods
    from dwiflow.tasks.stagelib import load_sh_image

    sh, _, _ = load_sh_image(fod[0])
    mask = nib.load(fod[1]).get_fdata() > 0
    options = {"peak_value_threshold": 0.0}
    never = segment_fods(sh, mask, lobe_merge_ratio=1.0, **options)
    default = segment_fods(sh, mask, **options)
    merged = segment_fods(sh, mask, lobe_merge_ratio=0.3, **options)
    assert np.array_equal(never.counts, default.counts) and np.array_equal(never.afd, default.afd)
    fewer = merged.counts < default.counts
    assert fewer.sum() > 100 and np.all(merged.counts <= default.counts)
    total_default, total_merged = default.per_voxel_sum(default.afd), merged.per_voxel_sum(merged.afd)
    assert np.allclose(total_merged[mask], total_default[mask], rtol=1e-9)


def test_shipped_fmls_tables_are_what_the_code_computes():
    from dwiflow.core.fixels import compute_fmls_tables, fmls_directions

    weights, pointer, index, covering = compute_fmls_tables()
    shipped = fmls_directions()
    assert np.abs(weights - shipped.weights).max() <= 1e-12
    assert np.array_equal(pointer, shipped.adjacency_pointer) and np.array_equal(index, shipped.adjacency_index)
    assert covering == shipped.covering_radius
    # the covering radius bounds every point's distance to its nearest direction, and is nearly reached
    rng = np.random.default_rng(5)
    points = rng.normal(size=(200000, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    nearest = np.arccos(np.clip(np.abs(points @ shipped.vectors.T).max(axis=1), 0, 1))
    assert nearest.max() <= covering and nearest.max() > 0.9 * covering
    # the weights integrate: a constant to 4π, a degree-2 zonal function to its integral (0)
    assert abs(weights.sum() / (4 * np.pi) - 1) < 1e-8
    z = shipped.vectors[:, 2]
    assert abs(np.sum(weights * (3 * z**2 - 1))) < 1e-7
    # adjacency is symmetric, 5 or 6 neighbours each (a tessellation of the sphere)
    neighbours = np.diff(pointer)
    assert set(neighbours) <= {5, 6}
    pairs = {(d, int(e)) for d in range(len(neighbours)) for e in index[pointer[d]:pointer[d + 1]]}
    assert all((e, d) in pairs for d, e in pairs)


def test_fixels_bad_input_is_refused_before_anything_is_written(fod, tmp_path, capsys):
    fod_path, mask_path = fod
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["fixels", str(fod_path), str(busy)]) == 2
    assert "already holds other files (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(nib.load(fod_path).shape[:3], np.uint8), nib.load(fod_path).affine), empty)
    assert main(["fixels", str(fod_path), str(tmp_path / "out"), "--mask", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["fixels", str(fod_path), str(tmp_path / "out"), "--fmls-lobe-merge-ratio", "1.5"]) == 2
    assert not (tmp_path / "out").exists()
