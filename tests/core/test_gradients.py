import warnings

import numpy as np
import pytest

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import cluster_shells, fsl_bvecs_to_world, gradient_table, world_to_fsl_bvecs
from dwiflow.tasks.io import load_dwi
from tests.conftest import real_run


def test_nearby_bvalues_form_one_shell_and_tiny_bvalues_are_b0():
    bvals = np.array([0.001, 0.004, 995, 1000, 1005, 2990, 3000, 0.002])
    shells = cluster_shells(bvals)
    assert [s.is_b0 for s in shells] == [True, False, False]
    assert shells[0].count == 3 and shells[0].bvalue == pytest.approx(0.007 / 3)
    assert shells[1].bvalue == pytest.approx(1000.0) and shells[1].count == 3
    assert shells[2].bvalue == pytest.approx(2995.0) and shells[2].count == 2


def test_b0_threshold_is_configurable():
    assert [s.count for s in cluster_shells(np.array([0, 40, 100, 1000]))] == [2, 1, 1]
    assert [s.count for s in cluster_shells(np.array([0, 40, 100, 1000]), b0_threshold=10)] == [1, 2, 1]


@pytest.mark.parametrize(
    "run, expected",
    [
        ("sub-01_acq-b1kb2k", [(0, 13), (1000, 30), (2000, 60)]),
        ("sub-01_acq-b6kmax", [(0, 6), (750, 3), (1500, 6), (2250, 9), (3000, 12), (3750, 15), (4500, 18), (5200, 21), (6000, 24)]),
        ("sub-02_dir-AP", [(0, 1), (2500, 20)]),
        ("sub-02_dir-PA", [(0, 1), (2500, 20)]),
        ("sub-03", [(0, 5), (1000, 12)]),
    ],
)
def test_shells_of_every_real_run(run, expected):
    paths = real_run(run)
    gtab = load_dwi(paths["dwi"], paths["bval"], paths["bvec"]).gtab
    got = [(s.bvalue, s.count) for s in gtab.shells]
    assert [c for _, c in got] == [c for _, c in expected]
    assert np.allclose([b for b, _ in got], [b for b, _ in expected], atol=1)
    assert gtab.shells[0].is_b0 and gtab.shells[0].bvalue < 0.01  # sub-03's b=0.001-0.004 count as b=0


def test_count_mismatch_names_both_numbers_and_files():
    bvecs = np.eye(3)[:, [0, 1, 2, 0]]
    with pytest.raises(DwiflowInputError, match=r"a\.bval has 5 b-values but b\.bvec has 4 directions"):
        gradient_table(np.array([0, 1000, 1000, 1000, 1000]), bvecs, bval_name="a.bval", bvec_name="b.bvec", frame="world")
    with pytest.raises(DwiflowInputError, match=r"dwi\.nii has 7 volumes but a\.bval has 4 b-values"):
        gradient_table(np.array([0, 1000, 1000, 1000]), bvecs, n_volumes=7, bval_name="a.bval", image_name="dwi.nii",
                       frame="world")


def test_n_by_3_bvecs_are_read_with_a_warning_and_give_the_same_table():
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((3, 10))
    vecs /= np.linalg.norm(vecs, axis=0)
    bvals = np.full(10, 1000.0)
    reference = gradient_table(bvals, vecs, frame="world")
    with pytest.warns(UserWarning, match="BIDS expects 3 rows"):
        transposed = gradient_table(bvals, vecs.T, frame="world")
    assert np.allclose(reference.bvecs, transposed.bvecs)


def test_non_unit_vectors_are_normalised_and_zero_b0_vectors_kept():
    vectors = np.array([[0, 0, 0], [2, 0, 0], [0, 0.5, 0]])  # one row per volume
    with pytest.warns(UserWarning, match=r"2 of the directions are not unit vectors .*b=1000 becomes 4000"):
        g = gradient_table(np.array([0, 1000, 1000]), vectors.T, frame="world")
    assert np.allclose(g.bvals, [0, 4000, 250])  # each b-value times its direction's squared norm (MRtrix3)
    assert np.allclose(np.linalg.norm(g.bvecs, axis=1), [0, 1, 1])
    assert np.allclose(g.bvecs[1], [1, 0, 0]) and np.allclose(g.bvecs[2], [0, 1, 0])


def test_dw_volume_without_direction_is_an_error():
    with pytest.raises(DwiflowInputError, match=r"volume\(s\) \[1\]"):
        gradient_table(np.array([0, 1000]), np.zeros((3, 2)), frame="world")


def test_fsl_rule_negative_determinant_is_plain_rotation():
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS storage
    world = fsl_bvecs_to_world(np.eye(3), affine)
    assert np.allclose(world, np.diag([-1.0, 1.0, 1.0]))


def test_fsl_rule_positive_determinant_flips_x_first():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS storage: FSL's x axis is flipped
    world = fsl_bvecs_to_world(np.eye(3), affine)
    assert np.allclose(world, np.diag([-1.0, 1.0, 1.0]))


def test_bvecs_do_not_change_when_storage_is_flipped_left_right():
    """FSL's convention makes bvecs independent of radiological/neurological storage."""
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    ras = las @ np.array([[-1, 0, 0, 9], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert np.linalg.det(ras[:3, :3]) > 0
    v = np.random.default_rng(0).standard_normal((5, 3))
    assert np.allclose(fsl_bvecs_to_world(v, las), fsl_bvecs_to_world(v, ras))


def test_oblique_affine_rotates_directions_and_round_trips():
    angle = np.radians(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.0, 2.5, 3.0])
    assert np.linalg.det(affine[:3, :3]) > 0
    v = np.random.default_rng(1).standard_normal((6, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    world = fsl_bvecs_to_world(v, affine)
    assert np.allclose(world, (v * [-1, 1, 1]) @ rot.T)
    assert np.allclose(world_to_fsl_bvecs(world, affine), v)


def test_subset_and_find_shell():
    g = gradient_table(np.array([0, 1000, 2000, 1000]), np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]).T,
                       frame="world")
    assert g.find_shell(990).count == 2
    with pytest.raises(DwiflowInputError, match="no shell at b=3000"):
        g.find_shell(3000)
    assert g.subset(np.array([1, 3])).n_volumes == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(g.shell_index) == [0, 1, 2, 1]


def test_the_frame_of_the_directions_must_be_said():
    """FSL/BIDS vectors taken for world coordinates rotate every fibre without a sound: no default frame."""
    bvals, bvecs = np.array([0, 1000, 1000, 1000]), np.eye(3)[:, [0, 0, 1, 2]]
    with pytest.raises(DwiflowInputError, match=r"affine=<the DWI's affine> for FSL/BIDS .* frame='world'"):
        gradient_table(bvals, bvecs)
    with pytest.raises(DwiflowInputError, match="frame='world' takes no affine"):
        gradient_table(bvals, bvecs, affine=np.eye(4), frame="world")
    with pytest.raises(DwiflowInputError, match="frame must be one of"):
        gradient_table(bvals, bvecs, frame="voxel")
    with pytest.raises(DwiflowInputError, match="frame='fsl' needs affine="):
        gradient_table(bvals, bvecs, frame="fsl")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # positive determinant: FSL's x is flipped
    fsl = gradient_table(bvals, bvecs, affine=affine)
    assert np.allclose(fsl.bvecs[1:], np.diag([-1.0, 1.0, 1.0]))
    assert np.allclose(gradient_table(bvals, bvecs, affine=affine, frame="fsl").bvecs, fsl.bvecs)
    assert np.allclose(gradient_table(bvals, bvecs, frame="world").bvecs[1:], np.eye(3))


def test_a_dipy_gradient_table_is_accepted_with_its_affine():
    from dipy.core.gradients import gradient_table as dipy_gradient_table

    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((12, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    bvals = np.r_[0.0, 0.0, np.full(10, 2000.0)]
    vectors[:2] = 0
    affine = np.array([[2.0, 0.3, 0, -90], [-0.3, 2.0, 0, -120], [0, 0, 2.5, -60], [0, 0, 0, 1]])
    dipy_table = dipy_gradient_table(bvals, bvecs=vectors, b0_threshold=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DIPY's n×3 layout is its own, not a transposed file: no warning
        ours = gradient_table(dipy_table, affine=affine)
    from_files = gradient_table(bvals, vectors.T, affine=affine)
    assert np.allclose(ours.bvecs, from_files.bvecs) and np.array_equal(ours.bvals, from_files.bvals)
    assert ours.b0_threshold == 60  # DIPY's threshold comes along
    with pytest.raises(DwiflowInputError, match="say which frame"):
        gradient_table(dipy_table)


def test_file_names_instead_of_arrays_name_the_readers(tmp_path):
    """DIPY's gradient_table reads file names; dwiflow.core reads no file. A DIPY user's gradient_table('x.bval',
    'x.bvec', affine=…) said "could not convert string to float"; it names the readers, whose arrays give the table
    the files' directions."""
    from dwiflow.tasks.io import load_gradients, read_bvals, read_bvecs

    paths = real_run("sub-03")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for bvals, bvecs, name in ((str(paths["bval"]), str(paths["bvec"]), "bvals"),
                               (read_bvals(paths["bval"]), paths["bvec"], "bvecs")):
        with pytest.raises(DwiflowInputError) as refused:
            gradient_table(bvals, bvecs, affine=affine)
        assert str(refused.value).startswith(f"{name}: got the file name ") and "read_bvals / read_bvecs" in str(
            refused.value)
    table = gradient_table(read_bvals(paths["bval"]), read_bvecs(paths["bvec"]), affine=affine)
    reference = load_gradients(paths["bval"], paths["bvec"], affine=affine, n_volumes=17)
    assert np.array_equal(table.bvals, reference.bvals) and np.array_equal(table.bvecs, reference.bvecs)


@pytest.mark.parametrize("call", [
    "TensorModel(g)", "DiffusionKurtosisModel(g)", "CsdModel(g, None)", "MsmtCsdModel(g, [None])",
    "Ss3tCsdModel(g, None, None, None)", "RumbaSDModel(g)", "MapmriModel(g)", "SmtModel(g)", "NoddiModel(g)",
    "dhollander(data, g, mask)", "tournier_response(data, g, mask)", "tax_response(data, g, mask)",
    "median_otsu_mask(data, g)",
])
def test_a_dipy_gradient_table_is_refused_with_the_conversion_to_use(call):
    """A DIPY GradientTable holds the .bvec file's voxel-axis directions: handed to an estimator as is, it would
    rotate every fibre; each public estimator refuses it with a TypeError that names the conversion (it raised an
    AttributeError about a missing attribute), and takes the converted table."""
    from dipy.core.gradients import gradient_table as dipy_gradient_table

    import dwiflow.core as api

    bvals = np.array([0.0, 1000, 1000, 1000, 2000, 2000, 2000])
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    names = {name: getattr(api, name) for name in ("TensorModel", "DiffusionKurtosisModel", "CsdModel",
                                                   "MsmtCsdModel", "Ss3tCsdModel", "RumbaSDModel", "MapmriModel",
                                                   "SmtModel", "NoddiModel", "dhollander", "tournier_response",
                                                   "tax_response", "median_otsu_mask")}
    names.update(g=dipy_gradient_table(bvals, bvecs=bvecs), data=np.ones((2, 2, 2, 7)), mask=np.ones((2, 2, 2), bool))
    with pytest.raises(TypeError, match=r"DIPY gradient table.*gradient_table\(gtab, affine=img\.affine\)"):
        eval(call, {}, names)
    converted = gradient_table(names["g"], affine=np.eye(4))
    assert np.allclose(np.abs(converted.bvecs[1:4]), np.eye(3))  # what the estimators take instead


def test_every_public_name_is_what_it_says_whatever_was_imported_before():
    """``from dwiflow.core import dhollander`` is the function also after the module that defines it was imported
    (a module named like the function replaced it on the package: the name then gave the module)."""
    import importlib

    import dwiflow.core as api

    for name, module in api._PUBLIC.items():
        importlib.import_module(f"dwiflow.core.{module}")
    for name in api.__all__:
        value = getattr(api, name)
        assert callable(value) and not isinstance(value, type(api)), name


def test_directions_that_are_not_unit_vectors_scale_their_b_values_as_mrtrix3(tmp_path, mrtrix):
    """A scheme that encodes b-values in the vectors' lengths (sub-03's nominal b=1000, nine directions shortened to
    0.7): each b-value is scaled by the squared norm, as MRtrix3 3.0.3 reads the same files (mrinfo -dwgrad), with a
    warning naming the file; unit vectors (to the files' six decimals) leave the b-values as they are."""
    import subprocess

    paths = real_run("sub-03")
    bvecs = np.loadtxt(paths["bvec"])
    bvecs[:, 8:] *= 0.7
    scaled = tmp_path / "scaled.bvec"
    np.savetxt(scaled, bvecs, fmt="%.6f")
    with pytest.warns(UserWarning, match=r"scaled\.bvec: 9 of the directions are not unit vectors \(norms 0\.7 to "
                                         r"0\.7\).*b=1000 becomes 490"):
        ours = load_dwi(paths["dwi"], paths["bval"], scaled).gtab.bvals
    table = subprocess.run(["mrinfo", str(paths["dwi"]), "-fslgrad", str(scaled), str(paths["bval"]), "-dwgrad"],
                           capture_output=True, text=True, check=True).stdout
    theirs = np.array([float(line.split()[3]) for line in table.splitlines()])
    assert np.allclose(ours, theirs, rtol=1e-5, atol=1e-6) and np.isclose(ours[9], 490, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unit = load_dwi(paths["dwi"], paths["bval"], paths["bvec"]).gtab.bvals
    assert np.array_equal(unit, np.loadtxt(paths["bval"]))
