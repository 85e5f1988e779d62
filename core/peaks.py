"""FOD peaks (local maxima) and FOD-derived scalar maps, vectorised across voxels.

Peaks: amplitudes of all voxels on a dense symmetric sphere (10242 points, ~2° spacing;
only one hemisphere is evaluated, the FOD being antipodally symmetric) come from one matrix
product; local maxima are vertices not exceeded by any neighbour of the triangulation; each
maximum is refined by fitting a quadratic to its amplitude and its neighbours' in the
tangent plane and moving to the quadratic's summit, and its amplitude is re-evaluated
exactly from the SH there. Peaks are kept in decreasing amplitude, subject to absolute and
relative thresholds and a minimum separation, as in MRtrix3's ``sh2peaks`` / DIPY's
``peak_directions``.

Optionally (``psf``), given the deconvolution's point-spread function (the FOD of one fibre,
:meth:`dwiflow.core.csd.CsdModel.point_spread_function`), peaks after the first are found as
CLEAN finds sources under a beam (Högbom 1974): the images of the fibres found so far (the
point-spread function turned onto each, directions and amplitudes fitted jointly by least squares
on the sphere) are subtracted, the largest maximum of what remains that passes the thresholds
(relative to the first peak) and the separation is a candidate, and it is kept when its own
fitted image still passes them. Two fibres 30-50° apart make one lobe with one maximum in an
lmax-8 FOD; once the stronger fibre's image is removed the weaker one is a maximum of its own.
The first peak stays the FOD's maximum; later peaks are the fitted directions scaled by their
image's amplitude on its axis. The point-spread function is exact for the response used; where
real fibres are more dispersed than the response, their broader lobes can leave residual
shoulders that count as second peaks, which is why this is not the default.

Scalar maps: total AFD (the l=0 coefficient; Raffelt et al. 2012), per-peak amplitude, the
number of fibre orientations (NuFO; Dell'Acqua et al. 2013) and the generalised fractional
anisotropy of the FOD amplitudes (GFA; Tuch 2004).

References
----------
Raffelt D. et al. Apparent fibre density. NeuroImage 59 (2012) 3976-3994.
Dell'Acqua F. et al. Can spherical deconvolution provide more information than fiber
orientations? Hum Brain Mapp 34 (2013) 2464-2483.
Tuch D.S. Q-ball imaging. Magn Reson Med 52 (2004) 1358-1372.
Högbom J.A. Aperture synthesis with a non-regular distribution of interferometer baselines.
Astron Astrophys Suppl 15 (1974) 417-426.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dwiflow.core.defaults import PEAKS_MIN_SEPARATION, PEAKS_NUMBER, PEAKS_REL_THRESHOLD
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.sh import expand_per_degree, lmax_from_n_coefficients, real_sh_basis, zonal_to_rotational_harmonics
from dwiflow.core.sphere import Sphere, geodesic_sphere, get_sphere
from dwiflow.core.voxels import VoxelBatch, iter_chunks, scatter


@dataclass(frozen=True)
class _Grid:
    """A hemisphere of a geodesic sphere with its neighbour table and quadratic-fit operators."""

    vertices: np.ndarray  # (h, 3)
    neighbours: np.ndarray  # (h, 6) hemisphere indices (antipodes folded), padded with self
    neighbour_dirs: np.ndarray  # (h, 6, 3) the neighbours as actual vectors (not folded)
    refine: np.ndarray  # (h, 6, 7) pseudo-inverse of the quadratic design over [self, neighbours]
    tangent: np.ndarray  # (h, 2, 3)


def _tangent_frame(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors spanning the plane tangent to each of ``directions`` (n, 3) at that direction."""
    e1 = np.cross(directions, np.where(np.abs(directions[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]]))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(directions, e1)


@lru_cache(maxsize=4)
def _grid(frequency: int) -> _Grid:
    sphere: Sphere = geodesic_sphere(frequency)
    v = sphere.vertices
    half = v.shape[0] // 2
    edges = sphere.edges
    both = np.concatenate([edges, edges[:, ::-1]])
    both = both[np.argsort(both[:, 0], kind="stable")]
    counts = np.bincount(both[:, 0], minlength=v.shape[0])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(both.shape[0]) - starts[both[:, 0]]
    ring = np.repeat(np.arange(v.shape[0])[:, None], 6, axis=1)
    ring[both[:, 0], slot] = both[:, 1]
    ring = ring[:half]
    folded = np.where(ring < half, ring, ring - half)
    centre = v[:half]
    e1, e2 = _tangent_frame(centre)
    nbr_dirs = v[ring]  # (h, 6, 3); padded slots repeat the centre
    cosang = np.clip(np.einsum("hkd,hd->hk", nbr_dirs, centre), -1, 1)
    t = nbr_dirs - cosang[..., None] * centre[:, None, :]
    norm = np.linalg.norm(t, axis=-1)
    scale = np.where(norm > 0, np.arccos(cosang) / np.where(norm > 0, norm, 1), 0.0)
    x = np.einsum("hkd,hd->hk", t, e1) * scale
    y = np.einsum("hkd,hd->hk", t, e2) * scale
    zeros = np.zeros((half, 1))
    xs, ys = np.concatenate([zeros, x], 1), np.concatenate([zeros, y], 1)
    design = np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)  # (h, 7, 6)
    design[:, 1:][ring == np.arange(half)[:, None]] = 0.0  # a padded slot (pentagon vertex) contributes nothing
    # the least-squares operators (h, 6, 7), (DᵀD)⁻¹Dᵀ: one batched 6x6 solve (a fifth of a batched pinv's time; the
    # design has full column rank at every vertex, five or six neighbours and the centre)
    transposed = np.swapaxes(design, 1, 2)
    refine = np.linalg.solve(transposed @ design, transposed)
    return _Grid(centre.copy(), folded, nbr_dirs, refine, np.stack([e1, e2], axis=1))


@lru_cache(maxsize=4)
def _coarse_to_fine(coarse_frequency: int, fine_frequency: int) -> np.ndarray:
    """Index in the fine hemisphere of each coarse hemisphere vertex (coarse ⊂ fine)."""
    coarse, fine = _grid(coarse_frequency).vertices, _grid(fine_frequency).vertices
    rows = 128  # coarse vertices per product: a (128, fine) block stays in cache (the whole product is ~50 MB)
    return np.concatenate([np.argmax(np.abs(coarse[start:start + rows] @ fine.T), axis=1)
                           for start in range(0, coarse.shape[0], rows)])


@lru_cache(maxsize=8)
def _grid_basis(frequency: int, lmax: int) -> np.ndarray:
    return np.ascontiguousarray(real_sh_basis(lmax, _grid(frequency).vertices))


@dataclass
class Peaks:
    """Peaks of a batch or volume: amplitude-scaled directions, NaN where absent."""

    vectors: np.ndarray  # (..., npeaks, 3)

    @property
    def amplitudes(self) -> np.ndarray:
        return np.linalg.norm(self.vectors, axis=-1)

    @property
    def count(self) -> np.ndarray:
        return np.sum(np.isfinite(self.vectors[..., 0]), axis=-1)


def rotated_zonal_sh(zonal: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """SH coefficients (n, n_coeffs) of the axially symmetric function with zonal coefficients
    ``zonal`` (about z) turned onto each of ``directions`` (n, 3): c_lm = z_l·sqrt(4π/(2l+1))·Y_lm(u)."""
    lmax = 2 * (np.size(zonal) - 1)
    return expand_per_degree(zonal_to_rotational_harmonics(zonal), lmax) * real_sh_basis(lmax, directions)


def _fit_images(sh, psf, units, iterations=3, step=1e-3):
    """Least-squares fit of Σ_j a_j·PSF(u_j) to FODs (r, n): directions (r, k, 3), amplitudes (r, k)
    and the images (r, k, n) at the fitted directions.

    Amplitudes by linear least squares at the given directions (Gram matrix Σ_l psf_l² P_l(u_i·u_j)),
    then damped Gauss–Newton on two tangent angles and one amplitude per image (Jacobian by central
    differences); amplitudes are kept ≥ 0.
    """
    r, k = units.shape[:2]

    def images_at(directions):
        return rotated_zonal_sh(psf, directions.reshape(-1, 3)).reshape(r, k, -1)

    images = images_at(units)
    cosines = np.clip(np.einsum("rki,rji->rkj", units, units), -1.0, 1.0)
    gram = np.polynomial.legendre.legvander(cosines, 2 * (psf.size - 1))[..., ::2] @ psf**2
    gram += 1e-9 * float(psf @ psf) * np.eye(k)  # images 1 degree apart are nearly collinear
    weights = np.maximum(np.linalg.solve(gram, np.einsum("rkn,rn->rk", images, sh)[..., None])[..., 0], 0.0)
    helper = np.where(np.abs(units[..., 2:3]) < 0.9, [0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
    for _ in range(iterations):
        e1 = np.cross(units, helper)
        e1 /= np.linalg.norm(e1, axis=-1, keepdims=True)
        e2 = np.cross(units, e1)
        residual = sh - np.einsum("rk,rkn->rn", weights, images)
        columns = [images]
        for e in (e1, e2):
            plus, minus = (images_at((units + sign * step * e) / np.sqrt(1 + step**2)) for sign in (1, -1))
            columns.append(weights[..., None] * (plus - minus) / (2 * step))
        jac = np.concatenate(columns, axis=1)  # (r, 3k, n): amplitudes, then angles along e1, e2
        normal = jac @ jac.transpose(0, 2, 1)
        normal += 1e-6 * np.einsum("rii->ri", normal)[..., None] * np.eye(3 * k) + 1e-12 * np.eye(3 * k)
        delta = np.linalg.solve(normal, (jac @ residual[..., None]))[..., 0]
        weights = np.maximum(weights + delta[:, :k], 0.0)
        moved = units + delta[:, k:2 * k, None] * e1 + delta[:, 2 * k:, None] * e2
        units = moved / np.linalg.norm(moved, axis=-1, keepdims=True)
        images = images_at(units)
    return units, weights, images


def _find_peaks_subtracting(sh, psf, npeaks, rel_threshold, abs_threshold, min_separation_deg, frequency):
    """Peaks by successive subtraction of the point-spread function ``psf`` (see the module notes).

    Round k: the images of the k fibres found so far are fitted jointly to the FOD (directions and
    amplitudes), removed, and the largest maximum of the residual that passes the thresholds and
    the separation is a candidate; it is kept when, fitted jointly with the others, its own image
    still passes them. The first peak is the FOD's maximum (as ``sh2peaks``); later peaks are the
    fitted directions scaled by their image's amplitude on its axis.
    """
    out = np.full((sh.shape[0], npeaks, 3), np.nan)
    out[:, :1] = find_peaks_batch(sh, 1, rel_threshold, abs_threshold, min_separation_deg, frequency)
    psf = np.asarray(psf, dtype=float)
    degrees = np.arange(0, 2 * psf.size, 2)
    psf_peak = float(psf @ np.sqrt((2 * degrees + 1) / (4 * np.pi)))  # an image's amplitude on its axis
    floor = np.maximum(abs_threshold, rel_threshold * np.linalg.norm(out[:, 0], axis=1))
    cos_sep = min(np.cos(np.radians(min_separation_deg)), np.cos(np.radians(1.0)))
    fitted = out / np.linalg.norm(out, axis=-1, keepdims=True)  # the directions fitted so far (unit)

    def separated(candidate, others):  # (r, 3) against (r, k, 3)
        return np.all(np.abs(np.einsum("rki,ri->rk", others, candidate)) < cos_sep, axis=1)

    for k in range(1, npeaks):
        rows = np.flatnonzero(np.isfinite(out[:, k - 1, 0]))
        if rows.size == 0:
            break
        units, weights, images = _fit_images(sh[rows], psf, fitted[rows, :k])
        residual = sh[rows] - np.einsum("rk,rkn->rn", weights, images)
        candidates = find_peaks_batch(residual, npeaks, 0.0, 0.0, min_separation_deg, frequency)
        cand_amp = np.linalg.norm(candidates, axis=-1)
        cand_unit = np.nan_to_num(candidates / np.where(cand_amp > 0, cand_amp, 1.0)[..., None])
        ok = np.nan_to_num(cand_amp, nan=-np.inf) >= floor[rows, None]
        for c in range(candidates.shape[1]):
            ok[:, c] &= separated(cand_unit[:, c], units)
        has = np.flatnonzero(ok.any(axis=1))
        if has.size == 0:
            break
        trial = np.concatenate([units[has], cand_unit[has, np.argmax(ok[has], axis=1)][:, None]], axis=1)
        trial_units, trial_weights, _ = _fit_images(sh[rows[has]], psf, trial)
        amplitude = trial_weights[:, k] * psf_peak
        keep = (amplitude >= floor[rows[has]]) & separated(trial_units[:, k], trial_units[:, :k])
        kept_rows = rows[has[keep]]
        fitted[kept_rows, : k + 1] = trial_units[keep]
        out[kept_rows, k] = trial_units[keep, k] * amplitude[keep, None]
    return out


def find_peaks_batch(
    sh: np.ndarray,
    npeaks: int = PEAKS_NUMBER,
    rel_threshold: float = PEAKS_REL_THRESHOLD,
    abs_threshold: float = 0.0,
    min_separation_deg: float = PEAKS_MIN_SEPARATION,
    frequency: int = 32,
    psf: np.ndarray | None = None,
) -> np.ndarray:
    """Peaks of (v, n_coeffs) FODs (MRtrix3 basis); returns (v, npeaks, 3), NaN-padded.

    With ``psf`` (zonal coefficients of the deconvolution's image of one fibre, same lmax),
    peaks after the first come from subtracting it at each peak found (CLEAN; Högbom 1974).
    """
    from dwiflow.core._peaks_kernel import hill_climb, largest_local_maxima, select_peaks  # compiled lazily (numba)

    if psf is not None and npeaks > 1:
        if 2 * (np.size(psf) - 1) != lmax_from_n_coefficients(sh.shape[1]):
            raise DwiflowInputError(f"the point-spread function has degree {2 * (np.size(psf) - 1)} but the FOD "
                                    f"has degree {lmax_from_n_coefficients(sh.shape[1])}")
        return _find_peaks_subtracting(sh, psf, npeaks, rel_threshold, abs_threshold, min_separation_deg, frequency)

    lmax = lmax_from_n_coefficients(sh.shape[1])
    coarse_f, fine_f = frequency // 2, frequency
    coarse = _grid(coarse_f)
    amps = np.asarray(sh, dtype=np.float32) @ _grid_basis(coarse_f, lmax).astype(np.float32).T  # (v, h)
    # local maxima on the coarse grid above the thresholds; only the largest few of each voxel
    # can become peaks: climb those
    per_voxel = 2 * npeaks + 2
    cand_vert, _ = largest_local_maxima(amps, coarse.neighbours, coarse.vertices.shape[0], float(abs_threshold),
                                        float(rel_threshold), True, per_voxel)
    vox, rank = np.nonzero(cand_vert >= 0)
    vert = cand_vert[vox, rank]
    out = np.full((sh.shape[0], npeaks, 3), np.nan)
    if vox.size == 0:
        return out
    # hill-climb on the fine grid with exact amplitudes, then a quadratic fit around the summit
    fine = _grid(fine_f)
    fine_basis = _grid_basis(fine_f, lmax)
    node, values = hill_climb(np.ascontiguousarray(sh[vox], dtype=np.float64),
                              _coarse_to_fine(coarse_f, fine_f)[vert], fine_basis, fine.neighbours, 6)
    coef = np.einsum("cij,cj->ci", fine.refine[node], values)
    c0, gx, gy, hxx, hxy, hyy = coef.T
    det = 4 * hxx * hyy - hxy**2
    ok = (hxx < 0) & (det > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(ok, (-2 * hyy * gx + hxy * gy) / det, 0.0)
        y = np.where(ok, (hxy * gx - 2 * hxx * gy) / det, 0.0)
    step = np.hypot(x, y)
    too_far = step > np.radians(2.5)  # stay within about one fine-grid spacing
    x[too_far] = y[too_far] = step[too_far] = 0.0
    peak_amp = np.where(step > 0, c0 + gx * x + gy * y + hxx * x * x + hxy * x * y + hyy * y * y, values[:, 0])
    direction_t = x[:, None] * fine.tangent[node, 0] + y[:, None] * fine.tangent[node, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        unit_t = np.where(step[:, None] > 0, direction_t / step[:, None], 0.0)
    dirs = np.cos(step)[:, None] * fine.vertices[node] + np.sin(step)[:, None] * unit_t
    # selection per voxel: decreasing amplitude, thresholds, separation
    order = np.lexsort((-peak_amp, vox))
    vox, dirs, peak_amp = vox[order], dirs[order], peak_amp[order]
    starts = np.searchsorted(vox, np.arange(sh.shape[0]))
    rank = np.arange(vox.size) - starts[vox]
    n_cand = min(int(rank.max()) + 1, 4 * npeaks + 8)
    keep = rank < n_cand
    cand_dirs = np.zeros((sh.shape[0], n_cand, 3))
    cand_amp = np.full((sh.shape[0], n_cand), -np.inf)
    cand_dirs[vox[keep], rank[keep]] = dirs[keep]
    cand_amp[vox[keep], rank[keep]] = peak_amp[keep]
    # two maxima that climbed to the same summit are one peak, whatever the minimum separation
    cos_sep = min(np.cos(np.radians(min_separation_deg)), np.cos(np.radians(1.0)))
    return select_peaks(cand_dirs, cand_amp, npeaks, float(rel_threshold), float(abs_threshold), float(cos_sep))


@lru_cache(maxsize=8)
def _neighbour_table(sphere_name: str) -> np.ndarray:
    """(n, max_degree) neighbour indices of a named sphere, padded with the vertex itself."""
    sphere = get_sphere(sphere_name)
    n = sphere.n_vertices
    both = np.concatenate([sphere.edges, sphere.edges[:, ::-1]])
    both = both[np.argsort(both[:, 0], kind="stable")]
    counts = np.bincount(both[:, 0], minlength=n)
    slot = np.arange(both.shape[0]) - np.concatenate([[0], np.cumsum(counts)[:-1]])[both[:, 0]]
    table = np.repeat(np.arange(n)[:, None], counts.max(), axis=1)
    table[both[:, 0], slot] = both[:, 1]
    return table


@lru_cache(maxsize=8)
def _vertex_search_tables(sphere_name: str, lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """SH basis (n_coeffs, m) at the vertices searched and the first hemisphere's neighbour table.

    When vertex i + n/2 is the antipode of vertex i (DIPY's symmetric spheres), an even-degree
    FOD has the same amplitude at both, so only the first half is evaluated (m = n/2) and
    neighbours in the second half are read at their antipodes.
    """
    v = get_sphere(sphere_name).vertices
    half = v.shape[0] // 2
    table = _neighbour_table(sphere_name)[:half]
    if v.shape[0] % 2 == 0 and np.array_equal(v[half:], -v[:half]):
        return np.ascontiguousarray(real_sh_basis(lmax, v[:half]).T), np.ascontiguousarray(table % half)
    return np.ascontiguousarray(real_sh_basis(lmax, v).T), np.ascontiguousarray(table)


def vertex_peaks(
    sh: np.ndarray,
    sphere_name: str = "repulsion724",
    npeaks: int = 2,
    rel_threshold: float = 0.5,
    min_separation_deg: float = 25.0,
) -> np.ndarray:
    """Unrefined peaks at the vertices of a symmetric sphere, as DIPY's ``peak_directions``.

    Local maxima over the triangulation's edges, kept in decreasing amplitude when at least
    ``rel_threshold`` of the largest and ``min_separation_deg`` away from those kept.
    Returns (v, npeaks, 3) amplitude-scaled vectors, NaN-padded.
    """
    from dwiflow.core._peaks_kernel import largest_local_maxima, select_peaks  # compiled lazily (numba)

    v = get_sphere(sphere_name).vertices
    half = v.shape[0] // 2  # only the first hemisphere is reported
    basis, table = _vertex_search_tables(sphere_name, lmax_from_n_coefficients(sh.shape[1]))
    amps = np.asarray(sh, dtype=float) @ basis
    order, cand_amp = largest_local_maxima(amps, table, half, 0.0, 0.0, False, 4 * npeaks + 4)
    cand_dir = np.ascontiguousarray(v[np.maximum(order, 0)])  # padding (amplitude -inf) is never accepted
    cos_sep = np.cos(np.radians(min_separation_deg))
    return select_peaks(cand_dir, cand_amp, npeaks, float(rel_threshold), -np.inf, float(cos_sep))


@lru_cache(maxsize=1)
def _quadratic_form_of_degree_2() -> np.ndarray:
    """The linear map from degree-2 SH coefficients (MRtrix3 basis, 6) to the symmetric matrix M (xx, yy, zz, xy, xz,
    yz) with uᵀMu equal to the function on the unit sphere: the degree-2 functions there are exactly the quadratic
    forms (x² + y² + z² = 1 absorbs the constant), so the least-squares fit on any 40 directions is exact."""
    directions = np.random.default_rng(0).normal(size=(40, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    x, y, z = directions.T
    monomials = np.stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z], axis=1)
    return np.linalg.lstsq(monomials, real_sh_basis(2, directions), rcond=None)[0]


def peak_amplitude_degree_2(sh: np.ndarray) -> np.ndarray:
    """The largest amplitude of each degree-2 SH function (``sh``: (..., 6), MRtrix3 basis): the largest eigenvalue
    of its quadratic form, in closed form — what a peak search on an lmax-2 FOD converges to (its only maxima are
    the antipodal pair along that eigenvector)."""
    sh = np.asarray(sh, dtype=np.float64)
    if sh.shape[-1] != 6:
        raise DwiflowInputError(f"degree-2 SH functions have 6 coefficients, got {sh.shape[-1]}")
    m = sh.reshape(-1, 6) @ _quadratic_form_of_degree_2().T
    matrices = np.empty((m.shape[0], 3, 3))
    for k, (i, j) in enumerate(((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))):
        matrices[:, i, j] = matrices[:, j, i] = m[:, k]
    return np.linalg.eigvalsh(matrices)[:, -1].reshape(sh.shape[:-1])


def largest_peak_amplitude(sh: np.ndarray, starts: int = 3, max_steps: int = 20) -> np.ndarray:
    """The largest amplitude of each SH function (``sh``: (n, n_coefficients), MRtrix3 basis), 0 where none is
    positive: what a peak search's first peak (sh2peaks ``-num 1``) converges to, for a few hundred voxels without a
    search grid or a compiled kernel.

    Each function is sampled on MRtrix3's 300 directions; from each of its ``starts`` largest samples a Newton
    ascent runs in the plane tangent to the current direction (gradient and Hessian from central differences of
    step 1e-4 rad, a step at most 0.1 rad, a gradient step where the Hessian is not negative definite) until every
    step is below 1e-10 rad or ``max_steps`` are taken; the largest amplitude reached is returned. The amplitude of
    a maximum is insensitive to its direction to first order, so it is exact to rounding."""
    from dwiflow.core.csd import mrtrix3_constraint_directions

    sh = np.asarray(sh, dtype=np.float64)
    n = sh.shape[0]
    if n == 0:
        return np.zeros(0)
    lmax = lmax_from_n_coefficients(sh.shape[1])
    samples = mrtrix3_constraint_directions()
    amplitudes = sh @ real_sh_basis(lmax, samples).T
    starts = min(starts, samples.shape[0])
    best = np.argpartition(-amplitudes, starts - 1, axis=1)[:, :starts]
    directions = samples[best].reshape(-1, 3)  # (n·starts, 3)
    coefficients = np.repeat(sh, starts, axis=0)
    h = 1e-4
    # tangent-plane offsets: centre, ±x, ±y, and the four diagonals
    offsets = np.array([[0, 0], [h, 0], [-h, 0], [0, h], [0, -h], [h, h], [-h, -h], [h, -h], [-h, h]])
    active = np.ones(directions.shape[0], dtype=bool)
    for _ in range(max_steps):
        u = directions[active]
        e1, e2 = _tangent_frame(u)
        points = u[:, None] + offsets[None, :, :1] * e1[:, None] + offsets[None, :, 1:] * e2[:, None]
        points /= np.linalg.norm(points, axis=2, keepdims=True)
        basis = real_sh_basis(lmax, points.reshape(-1, 3)).reshape(points.shape[0], 9, -1)
        f = np.einsum("vpc,vc->vp", basis, coefficients[active])
        gx, gy = (f[:, 1] - f[:, 2]) / (2 * h), (f[:, 3] - f[:, 4]) / (2 * h)
        hxx = (f[:, 1] - 2 * f[:, 0] + f[:, 2]) / (h * h)
        hyy = (f[:, 3] - 2 * f[:, 0] + f[:, 4]) / (h * h)
        hxy = (f[:, 5] + f[:, 6] - f[:, 7] - f[:, 8]) / (4 * h * h)
        determinant = hxx * hyy - hxy * hxy
        concave = (hxx < 0) & (determinant > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            step_x = np.where(concave, -(hyy * gx - hxy * gy) / determinant, gx)
            step_y = np.where(concave, -(hxx * gy - hxy * gx) / determinant, gy)
        length = np.hypot(step_x, step_y)
        limit = 0.1 / np.where(length > 0, length, 1.0)  # a step of at most 0.1 rad; a gradient step of 0.1 rad
        scale = np.where(concave, np.minimum(1.0, limit), limit)
        step_x, step_y = step_x * scale, step_y * scale
        moved = u + step_x[:, None] * e1 + step_y[:, None] * e2
        directions[active] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
        still = np.hypot(step_x, step_y) >= 1e-10
        active[np.flatnonzero(active)[~still]] = False
        if not active.any():
            break
    peak = np.einsum("vc,vc->v", real_sh_basis(lmax, directions), coefficients).reshape(n, starts)
    return np.maximum(peak.max(axis=1), 0.0)


def find_peaks_rows(sh: np.ndarray, chunk_size: int = 4000, **options) -> np.ndarray:
    """:func:`find_peaks_batch` over (v, n_coeffs) rows in chunks (bounded memory)."""
    out = np.empty((sh.shape[0], options.get("npeaks", 3), 3))
    for sl in iter_chunks(sh.shape[0], chunk_size):
        out[sl] = find_peaks_batch(sh[sl], **options)
    return out


def find_peaks(
    sh: np.ndarray,
    mask: np.ndarray | None = None,
    npeaks: int = PEAKS_NUMBER,
    rel_threshold: float = PEAKS_REL_THRESHOLD,
    abs_threshold: float = 0.0,
    min_separation_deg: float = PEAKS_MIN_SEPARATION,
    chunk_size: int = 4000,
    psf: np.ndarray | None = None,
) -> Peaks:
    """Peaks of an SH volume (…, n_coeffs) inside ``mask``; NaN elsewhere and where absent.

    ``psf``: the deconvolution's point-spread function (zonal coefficients), to find peaks after
    the first by subtracting it (see the module notes); None: local maxima of the FOD only.
    """
    if npeaks < 1:
        raise DwiflowInputError(f"npeaks must be >= 1, got {npeaks}")
    if not 0 <= rel_threshold < 1:
        raise DwiflowInputError(f"rel_threshold must be in [0, 1), got {rel_threshold}")
    if not 0 <= min_separation_deg < 90:
        raise DwiflowInputError(f"min_separation must be in [0, 90) degrees, got {min_separation_deg}")
    lmax_from_n_coefficients(np.shape(sh)[-1])
    finite = np.all(np.isfinite(sh), axis=-1)
    mask = finite if mask is None else (np.asarray(mask, dtype=bool) & finite)
    if not mask.any():
        raise DwiflowInputError("no voxel with a finite FOD inside the mask")
    batch = VoxelBatch.from_volume(sh, mask)
    vectors = find_peaks_rows(batch.signal(), chunk_size, npeaks=npeaks, rel_threshold=rel_threshold,
                              abs_threshold=abs_threshold, min_separation_deg=min_separation_deg, psf=psf)
    return Peaks(scatter(vectors, batch, fill=np.nan))


def generalized_fa(sh: np.ndarray, sphere_name: str = "ico642", chunk_size: int = 4096) -> np.ndarray:
    """GFA of the FOD amplitudes on a sphere: std / rms (Tuch 2004); 0 where the FOD is zero (outside the mask).
    Computed over the voxels with an FOD, ``chunk_size`` at a time (the amplitudes of a whole field of view would
    take gigabytes)."""
    v = get_sphere(sphere_name).hemisphere
    sh = np.asarray(sh)
    basis_t = real_sh_basis(lmax_from_n_coefficients(sh.shape[-1]), v).T
    rows = sh.reshape(-1, sh.shape[-1])
    out = np.zeros(rows.shape[0])
    voxels = np.flatnonzero(np.any(rows != 0, axis=1))
    for part in np.array_split(voxels, max(1, -(-voxels.size // chunk_size))):
        amps = rows[part] @ basis_t
        n = amps.shape[-1]
        num = n * np.sum((amps - amps.mean(axis=-1, keepdims=True)) ** 2, axis=-1)
        den = (n - 1) * np.sum(amps**2, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[part] = np.where(den > 0, np.sqrt(num / den), 0.0)
    return out.reshape(sh.shape[:-1])


def fod_metrics(sh: np.ndarray, peaks: np.ndarray) -> dict[str, np.ndarray]:
    """Total AFD (l=0 coefficient), per-peak amplitudes, NuFO and GFA.

    ``peaks`` is (…, 3·npeaks) or (…, npeaks, 3), amplitude-scaled, NaN where absent.
    """
    sh = np.asarray(sh, dtype=float)
    p = np.asarray(peaks, dtype=float)
    if p.shape[-1] != 3:
        if p.shape[-1] % 3:
            raise DwiflowInputError(f"peaks must have 3 values per peak; last axis has {p.shape[-1]}")
        p = p.reshape(p.shape[:-1] + (-1, 3))
    if p.shape[:-2] != sh.shape[:-1]:
        raise DwiflowInputError(f"peaks grid {p.shape[:-2]} differs from the FOD grid {sh.shape[:-1]}")
    amplitude = np.linalg.norm(p, axis=-1)
    return {
        "afd_total": sh[..., 0],
        "peak_amplitude": amplitude,
        "nufo": np.sum(np.isfinite(amplitude), axis=-1).astype(np.uint8),
        "gfa": generalized_fa(sh),
    }


def sh2peaks_seed_directions() -> np.ndarray:
    """The 60 unit vectors MRtrix3 3.0's ``sh2peaks`` starts its searches from, in its order (float32, as there)."""
    from dwiflow.core._mrtrix3_directions import SH2PEAKS_SEEDS

    values = np.asarray(SH2PEAKS_SEEDS, dtype=np.float32)
    azimuth, elevation = values[:60], values[60:]  # a column-major 60×2 matrix, as sh2peaks maps the array
    return np.stack([np.cos(azimuth) * np.sin(elevation), np.sin(azimuth) * np.sin(elevation), np.cos(elevation)],
                    axis=1).astype(np.float32).astype(np.float64)


def sh2peaks(sh: np.ndarray, npeaks: int = PEAKS_NUMBER, threshold: float = -np.inf,
             seeds: np.ndarray | None = None) -> np.ndarray:
    """FOD peaks exactly as MRtrix3 3.0's ``sh2peaks`` finds them (Jeurissen et al. 2013): a Newton ascent from each
    of 60 seed directions, peaks within arccos(0.99) of an earlier one dropped, those with amplitude >= ``threshold``
    sorted by amplitude; the ``npeaks`` largest as amplitude-scaled vectors, NaN-padded.

    Parameters
    ----------
    sh : ndarray (..., n_coefficients)
        FODs (MRtrix3 basis, world frame).
    npeaks : int
        sh2peaks' ``-num``.
    threshold : float
        sh2peaks' ``-threshold`` (absolute amplitude; default: none).
    seeds : ndarray (n, 3), optional
        Start directions (sh2peaks' ``-seeds``); default its built-in 60.

    Returns
    -------
    ndarray (..., npeaks, 3)

    References
    ----------
    Jeurissen B. et al. Investigating the prevalence of complex fiber configurations in white matter tissue with
    diffusion magnetic resonance imaging. Hum Brain Mapp 34 (2013) 2747-2766.
    """
    from dwiflow.core._sh2peaks_kernel import search_peaks  # compiled lazily (numba)

    sh = np.asarray(sh, dtype=np.float64)
    lmax = lmax_from_n_coefficients(sh.shape[-1])
    if int(npeaks) != npeaks or npeaks < 1:
        raise DwiflowInputError(f"npeaks must be a positive integer, got {npeaks!r}", parameters=("npeaks",))
    seed_vectors = sh2peaks_seed_directions() if seeds is None else np.asarray(seeds, dtype=np.float64)
    rows = np.ascontiguousarray(sh.reshape(-1, sh.shape[-1]))
    out = np.empty((rows.shape[0], int(npeaks), 3))
    search_peaks(rows, lmax, np.ascontiguousarray(seed_vectors), int(npeaks), float(threshold), out)
    return out.reshape(sh.shape[:-1] + (int(npeaks), 3))
