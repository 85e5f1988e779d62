import nibabel as nib
import numpy as np
import pytest

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.mask import median_otsu_mask, otsu_threshold
from dwiflow.core.sims import acquisition_scheme, make_phantom, multi_tensor_signal
from dwiflow.tasks.io import load_dwi
from tests.conftest import real_run


@pytest.mark.parametrize("run", ["sub-01_acq-b1kb2k", "sub-01_acq-b6kmax"])
def test_median_otsu_mask_agrees_with_the_shipped_brain_mask(run):
    paths = real_run(run)
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    ours = median_otsu_mask(dwi.data, dwi.gtab)
    ref = nib.load(paths["mask"]).get_fdata() > 0
    dice = 2 * (ours & ref).sum() / (ours.sum() + ref.sum())
    assert dice > 0.85


@pytest.mark.parametrize("size", [(9, 9, 9), (3, 5, 1), (1, 9, 3), (7, 1, 1), (1, 1, 1)])
def test_median_filter_equals_scipys(size):
    """The compiled median filter gives scipy.ndimage.median_filter's values (mode "nearest", as DIPY's median_otsu
    filters) on continuous values, on values with many ties, on an image smaller than the window, and on the mean
    b=0 image of real data; two passes equal SciPy's filter applied twice."""
    from scipy import ndimage

    from dwiflow.core.mask import mean_b0, median_filter

    rng = np.random.default_rng(3)
    images = [rng.normal(size=(14, 11, 9)), rng.integers(0, 4, size=(10, 12, 7)).astype(float), rng.random((3, 2, 4))]
    if size == (9, 9, 9):  # median_otsu's window, on a whole-brain run (Siemens, sub-02)
        paths = real_run("sub-02_dir-AP")
        run = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
        images.append(np.nan_to_num(mean_b0(run.data, run.gtab)))
    for image in images:
        once = ndimage.median_filter(image, size=size, mode="nearest")
        assert np.array_equal(median_filter(image, size), once)
        assert np.array_equal(median_filter(image, size, passes=2), ndimage.median_filter(once, size=size,
                                                                                         mode="nearest"))
    with pytest.raises(ValueError, match="odd window widths"):
        median_filter(images[0], (4, 3, 3))


def test_otsu_separates_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 1, 1000), rng.normal(50, 3, 500)])
    threshold = otsu_threshold(values)
    assert values[:1000].max() < threshold < values[1000:].min()


def test_mask_errors():
    gtab = acquisition_scheme("single")
    with pytest.raises(DwiflowInputError, match="all zero"):
        median_otsu_mask(np.zeros((4, 4, 4, gtab.n_volumes)), gtab)
    with pytest.raises(DwiflowInputError, match="must be 4D"):
        median_otsu_mask(np.zeros((4, 4, gtab.n_volumes)), gtab)
    assert median_otsu_mask(np.full((4, 4, 4, gtab.n_volumes), 7.0), gtab).all()  # constant positive b=0: all tissue
    no_b0 = gtab.subset(np.flatnonzero(~gtab.b0s_mask))
    with pytest.raises(DwiflowInputError, match="no b=0 volume"):
        median_otsu_mask(np.ones((4, 4, 4, no_b0.n_volumes)), no_b0)


def test_phantom_ground_truth_is_consistent():
    gtab = acquisition_scheme("multi")
    ph = make_phantom(gtab, (8, 8, 4), n_fibres=(1, 2, 3), csf_fraction=(0.0, 0.3), snr=None, seed=3)
    present = ph.fractions > 0
    assert np.array_equal(present.sum(-1), ph.n_fibres)
    assert np.allclose(ph.fractions.sum(-1), 1)
    assert np.all(ph.fractions[present] >= 0.2 - 1e-12)
    # fibres of a voxel are at least 45 degrees apart
    d = np.nan_to_num(ph.directions.reshape(-1, 3, 3))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        both = (np.linalg.norm(d[:, a], axis=1) > 0) & (np.linalg.norm(d[:, b], axis=1) > 0)
        assert np.all(np.abs(np.sum(d[both, a] * d[both, b], 1)) < np.cos(np.radians(45)) + 1e-12)
    # b=0 signal equals S0 and the b>0 signal of a single fibre is the analytic one
    assert np.allclose(ph.noiseless[..., gtab.b0s_mask], 100.0)
    single = multi_tensor_signal(gtab, np.array([[0, 0, 1.0]]), np.array([1.0]))
    along = np.flatnonzero(np.abs(gtab.bvecs[:, 2]) > 0.99)
    assert np.allclose(single[along], 100 * np.exp(-gtab.bvals[along] * 1.7e-3), rtol=1e-2)


def test_rician_noise_level_matches_the_snr():
    gtab = acquisition_scheme("single")
    ph = make_phantom(gtab, (30, 30, 10), n_fibres=1, snr=20, seed=5)
    b0 = ph.data[..., gtab.b0s_mask]
    assert abs(b0.std() - 100 / 20) < 0.25  # at high SNR Rician noise is nearly Gaussian
