"""Fixels: FOD lobes segmented as MRtrix3's ``fod2fixel`` (FMLS; Smith et al. 2013), and AFD per lobe.

:func:`segment_fods` gives, per voxel, the fixels of its FOD — mean direction (or peak direction), apparent fibre
density (the lobe's integral; Raffelt et al. 2012), peak amplitude and dispersion (integral / peak) — in the sparse
layout of an MRtrix3 fixel directory: a per-voxel (count, offset) index and one row per fixel.

References
----------
Smith R.E., Tournier J.-D., Calamante F., Connelly A. SIFT: Spherical-deconvolution informed filtering of
tractograms. NeuroImage 67 (2013) 298-312, appendix 2.

Raffelt D. et al. Apparent Fibre Density: a novel measure for the analysis of diffusion-weighted magnetic resonance
images. NeuroImage 59 (2012) 3976-3994.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.sh import lmax_from_n_coefficients, real_sh_basis

INTEGRAL_THRESHOLD = 0.0  # fod2fixel's defaults (src/dwi/fmls.h)
PEAK_VALUE_THRESHOLD = 0.1
LOBE_MERGE_RATIO = 1.0
FIXELS_PER_VOXEL_START = 16  # the kernel's first guess; voxels with more are segmented again with room for all


@dataclass(frozen=True)
class FmlsDirections:
    """The direction set FMLS samples FODs on, with what the segmentation needs of it."""

    vectors: np.ndarray  # (n, 3) unit vectors
    azimuth: np.ndarray
    elevation: np.ndarray
    weights: np.ndarray  # integration weights: sum_d w_d f(d) ≈ ∫ f over the sphere
    adjacency_pointer: np.ndarray  # CSR: neighbours of d are adjacency_index[pointer[d]:pointer[d+1]]
    adjacency_index: np.ndarray
    covering_radius: float  # radians: no point of the sphere is farther from its nearest direction


def _tessellation() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from dwiflow.core._mrtrix3_directions import TESSELLATION_1281

    pairs = np.asarray(TESSELLATION_1281, dtype=np.float64)
    azimuth, elevation = pairs[:, 0], pairs[:, 1]
    vectors = np.stack([np.cos(azimuth) * np.sin(elevation), np.sin(azimuth) * np.sin(elevation), np.cos(elevation)],
                       axis=1)
    return vectors, azimuth, elevation


def compute_fmls_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Integration weights, adjacency (CSR pointer, index) and covering radius of the 1281 directions.

    Weights and adjacency are as ``fod2fixel`` builds them; the covering radius (radians) is the largest angle from
    any point of the sphere to its nearest direction: the largest angle from a hull facet's outward normal (a
    Voronoi vertex) to the facet's corners.

    Two directions are adjacent when an edge of the convex hull of the set and its antipodes joins them (or their
    antipodes); the weights are the least-squares solution making the weighted sum of every real SH of degree
    <= 50 equal its integral (MRtrix3's ``IntegrationWeights``: degree = the largest the set supports, + 2).
    Takes ~1.3 s, so :mod:`dwiflow.core._fmls_tables` keeps the result (a test recomputes it).
    """
    from scipy.spatial import ConvexHull

    vectors, azimuth, elevation = _tessellation()
    n = vectors.shape[0]
    hull = ConvexHull(np.concatenate([vectors, -vectors]))
    corners = hull.simplices % n  # vertex i and its antipode n + i are direction i
    edges = np.concatenate([corners[:, [0, 1]], corners[:, [1, 2]], corners[:, [2, 0]]])
    edges = np.unique(np.concatenate([edges, edges[:, ::-1]]), axis=0)  # sorted by (from, to)
    pointer = np.searchsorted(edges[:, 0], np.arange(n + 1)).astype(np.int64)
    calibration_lmax = 2 * int((np.sqrt(1.0 + 8.0 * n) - 3.0) / 4.0) + 2
    basis = real_sh_basis(calibration_lmax, polar=elevation, azimuth=azimuth)  # (n, coefficients)
    integrals = np.zeros(basis.shape[1])
    integrals[0] = 2.0 * np.sqrt(np.pi)  # ∫ Y00 = 4π · 1/√(4π)
    weights = np.linalg.lstsq(basis.T, integrals, rcond=None)[0]
    facet_normals = hull.equations[:, :3] / np.linalg.norm(hull.equations[:, :3], axis=1, keepdims=True)
    corner_points = np.concatenate([vectors, -vectors])[hull.simplices]  # (facets, 3, 3)
    covering = float(np.arccos(np.min(np.einsum("fk,fck->fc", facet_normals, corner_points))))
    return weights, pointer, np.ascontiguousarray(edges[:, 1]).astype(np.int64), covering


def write_fmls_tables(path: str | None = None) -> None:
    """Regenerate :mod:`dwiflow.core._fmls_tables` from :func:`compute_fmls_tables`."""
    import textwrap
    from pathlib import Path

    import dwiflow.core._fmls_tables as tables

    weights, pointer, index, covering = compute_fmls_tables()
    target = Path(path or tables.__file__)
    header = target.read_text().split("WEIGHTS = (")[0]

    def listing(name: str, values: list[str]) -> str:
        body = textwrap.fill(", ".join(values), 116, initial_indent="    ", subsequent_indent="    ")
        return f"{name} = (\n{body},\n)\n"

    target.write_text(header + listing("WEIGHTS", [repr(float(w)) for w in weights]) + "\n"
                      + listing("ADJACENCY_POINTER", [str(p) for p in pointer]) + "\n"
                      + listing("ADJACENCY_INDEX", [str(i) for i in index]) + "\n"
                      + f"COVERING_RADIUS = {covering!r}\n")


@lru_cache(maxsize=1)
def fmls_directions() -> FmlsDirections:
    """MRtrix3's 1281-direction tessellation with the adjacency and integration weights ``fod2fixel`` uses (the
    tables :func:`compute_fmls_tables` computes, as kept in :mod:`dwiflow.core._fmls_tables`)."""
    from dwiflow.core._fmls_tables import ADJACENCY_INDEX, ADJACENCY_POINTER, COVERING_RADIUS, WEIGHTS

    vectors, azimuth, elevation = _tessellation()
    return FmlsDirections(vectors, azimuth, elevation, np.asarray(WEIGHTS, dtype=np.float64),
                          np.asarray(ADJACENCY_POINTER, dtype=np.int64), np.asarray(ADJACENCY_INDEX, dtype=np.int64),
                          float(COVERING_RADIUS))


@dataclass
class Fixels:
    """Fixels of an FOD image in MRtrix3's sparse layout: voxel v (in C order of ``shape``) has ``counts[v]`` fixels,
    rows ``offsets[v]`` … of ``directions``, ``afd``, ``peak_amplitude`` and ``dispersion``."""

    shape: tuple[int, ...]
    counts: np.ndarray
    offsets: np.ndarray
    directions: np.ndarray
    afd: np.ndarray
    peak_amplitude: np.ndarray

    @property
    def dispersion(self) -> np.ndarray:
        """fod2fixel's ``-disp``: a lobe's integral over its peak amplitude."""
        return self.afd / self.peak_amplitude

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def per_voxel_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of a per-fixel value over each voxel's fixels (0 where none): e.g. the total AFD."""
        n_voxels = int(np.prod(self.shape))
        owner = np.repeat(np.arange(n_voxels), self.counts.ravel())
        return np.bincount(owner, weights=values, minlength=n_voxels).reshape(self.shape)


SAMPLING_BLOCK = 1024  # voxels per block of the sampling and sorting threads (fixed: the same bits at any thread count)


def sampled_and_ordered(rows: np.ndarray, basis: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The FODs (rows) sampled on the directions (``basis``: directions × coefficients), and each row's visiting keys,
    sorted: its positive amplitudes as integers (the float's bits, monotone for positive floats, with the lowest 11
    replaced by 2047 − direction, so that equal amplitudes sort in direction order as fod2fixel's multimap visits
    them), non-positive amplitudes −1. Amplitudes within 2⁻⁴¹ of each other (relative) count as equal. Blocks of
    :data:`SAMPLING_BLOCK` rows run in ``n_threads`` threads, each with single-threaded BLAS."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from dwiflow.core._fmls_kernel import visiting_keys

    if basis.shape[0] > 2048:
        raise ValueError("at most 2048 directions")
    amplitudes = np.empty((rows.shape[0], basis.shape[0]))
    keys = np.empty(amplitudes.shape, dtype=np.int64)

    def block(start: int) -> None:
        part = slice(start, start + SAMPLING_BLOCK)
        np.matmul(rows[part], basis.T, out=amplitudes[part])
        visiting_keys(amplitudes[part], keys[part])
        keys[part].sort(axis=1)

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        list(pool.map(block, range(0, rows.shape[0], SAMPLING_BLOCK)))
    return amplitudes, keys


def segment_fods(
    sh: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    integral_threshold: float = INTEGRAL_THRESHOLD,
    peak_value_threshold: float = PEAK_VALUE_THRESHOLD,
    lobe_merge_ratio: float = LOBE_MERGE_RATIO,
    max_fixels: int = 0,
    direction_from_peak: bool = False,
) -> Fixels:
    """Segment FODs into fixels exactly as MRtrix3 3.0's ``fod2fixel`` (FMLS, Smith et al. 2013, appendix 2).

    Parameters
    ----------
    sh : ndarray (..., n_coefficients)
        FODs in MRtrix3's SH basis (world frame).
    mask : ndarray (...), optional
        Voxels to segment (others get no fixels).
    integral_threshold, peak_value_threshold : float
        ``-fmls_integral`` and ``-fmls_peak_value``: lobes whose AFD, or whose peak amplitude, is below are dropped.
    lobe_merge_ratio : float
        ``-fmls_lobe_merge_ratio`` in [0, 1]: two lobes merge where the FOD between them exceeds this fraction of the
        smaller one's peak (1: never).
    max_fixels : int
        ``-maxnum``: keep at most this many fixels per voxel, the largest peaks first (0: all).
    direction_from_peak : bool
        ``-dirpeak``: a fixel's direction is its lobe's largest peak, not its amplitude-weighted mean direction.

    Returns
    -------
    Fixels
        Voxels in C order; fixels within a voxel by decreasing sampled peak amplitude (fod2fixel's order).

    References
    ----------
    Smith R.E. et al. SIFT: Spherical-deconvolution informed filtering of tractograms. NeuroImage 67 (2013) 298-312.
    Raffelt D. et al. Apparent Fibre Density. NeuroImage 59 (2012) 3976-3994.
    """
    import numba

    from dwiflow.core._fmls_kernel import segment_rows
    from dwiflow.core._sh2peaks_kernel import precompute_legendre

    n_threads = numba.get_num_threads()

    sh = np.asarray(sh)
    lmax = lmax_from_n_coefficients(sh.shape[-1])
    if not 0.0 <= lobe_merge_ratio <= 1.0:
        raise DwiflowInputError(f"lobe merge ratio must be in [0, 1], got {lobe_merge_ratio}",
                                parameters=("lobe_merge_ratio",))
    for name, value in (("integral_threshold", integral_threshold), ("peak_value_threshold", peak_value_threshold)):
        if not (np.isfinite(value) and value >= 0):
            raise DwiflowInputError(f"{name} must be a non-negative number, got {value}", parameters=(name,))
    if int(max_fixels) != max_fixels or max_fixels < 0:
        raise DwiflowInputError(f"max_fixels must be a non-negative integer, got {max_fixels}",
                                parameters=("max_fixels",))
    shape = sh.shape[:-1]
    rows = sh.reshape(-1, sh.shape[-1])
    selected = np.all(np.isfinite(rows), axis=1)
    if mask is not None:
        selected &= np.asarray(mask, dtype=bool).reshape(-1)
    voxel_index = np.flatnonzero(selected)
    directions = fmls_directions()
    basis = real_sh_basis(lmax, polar=directions.elevation, azimuth=directions.azimuth)  # (1281, coefficients)
    samples = precompute_legendre(lmax, 2 * directions.vectors.shape[0])  # fod2fixel's PrecomputedAL size
    counts = np.zeros(rows.shape[0], np.int64)
    found: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    chunk = 4096
    for start in range(0, voxel_index.size, chunk):
        index = voxel_index[start:start + chunk]
        capacity = FIXELS_PER_VOXEL_START
        todo = np.arange(index.size)
        block_dirs = np.zeros((index.size, capacity, 3))
        block_afd = np.zeros((index.size, capacity))
        block_peak = np.zeros((index.size, capacity))
        block_rows = np.ascontiguousarray(rows[index], dtype=np.float64)
        while todo.size:
            part_rows = block_rows[todo]
            amplitudes, keys = sampled_and_ordered(part_rows, basis, n_threads)
            part_dirs = np.zeros((todo.size, capacity, 3))
            part_afd = np.zeros((todo.size, capacity))
            part_peak = np.zeros((todo.size, capacity))
            part_count = np.zeros(todo.size, np.int64)
            segment_rows(amplitudes, keys, part_rows, lmax, directions.vectors, directions.weights,
                         directions.adjacency_pointer, directions.adjacency_index, samples,
                         directions.covering_radius,
                         float(integral_threshold), float(peak_value_threshold), float(lobe_merge_ratio),
                         bool(direction_from_peak), part_dirs, part_afd, part_peak, part_count, n_threads)
            if capacity > block_afd.shape[1]:
                block_dirs = np.concatenate([block_dirs, np.zeros((index.size, capacity - block_dirs.shape[1], 3))], 1)
                block_afd = np.concatenate([block_afd, np.zeros((index.size, capacity - block_afd.shape[1]))], 1)
                block_peak = np.concatenate([block_peak, np.zeros((index.size, capacity - block_peak.shape[1]))], 1)
            fits = part_count <= capacity
            done = todo[fits]
            block_dirs[done, :capacity] = part_dirs[fits]
            block_afd[done, :capacity] = part_afd[fits]
            block_peak[done, :capacity] = part_peak[fits]
            counts[index[done]] = part_count[fits]
            if not fits.all():
                capacity = int(part_count.max())
            todo = todo[~fits]
        found[start] = (block_dirs, block_afd, block_peak)
    if max_fixels:
        counts = np.minimum(counts, int(max_fixels))
    offsets = np.zeros(rows.shape[0], np.int64)
    offsets[1:] = np.cumsum(counts)[:-1]
    total = int(counts.sum())
    out_dirs = np.zeros((total, 3))
    out_afd = np.zeros(total)
    out_peak = np.zeros(total)
    for start, (block_dirs, block_afd, block_peak) in found.items():
        index = voxel_index[start:start + chunk]
        n = counts[index]
        keep = np.arange(block_afd.shape[1])[None, :] < n[:, None]
        target = np.repeat(offsets[index], n) + (np.cumsum(keep, axis=1) - 1)[keep]
        out_dirs[target] = block_dirs[keep]
        out_afd[target] = block_afd[keep]
        out_peak[target] = block_peak[keep]
    offsets[counts == 0] = 0  # as fod2fixel leaves voxels without fixels
    return Fixels(shape, counts.reshape(shape), offsets.reshape(shape), out_dirs, out_afd, out_peak)
