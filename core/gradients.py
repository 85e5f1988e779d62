"""Gradient tables: b-values, unit directions in world coordinates, b=0 detection, shells.

Conventions (DESIGN.md): b in s/mm²; volumes with b <= ``b0_threshold`` (default 50)
are b=0; shells are b-values clustered with a tolerance (MRtrix3 uses 80 s/mm²);
directions are stored in world (scanner) coordinates. BIDS/FSL ``.bvec`` files are
given in the image's voxel axes with the x axis flipped whenever the voxel-to-world
matrix has a positive determinant (FSL's convention); :func:`fsl_bvecs_to_world`
undoes that once, on reading, as MRtrix3 does.

References
----------
Jenkinson M. et al. FSL. NeuroImage 62 (2012) 782-790 (bvec convention).
Tournier J-D. et al. MRtrix3. NeuroImage 202 (2019) 116137 (shell clustering, world frame).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dwiflow.core.defaults import B0_THRESHOLD
from dwiflow.core.errors import DwiflowInputError

DEFAULT_B0_THRESHOLD = B0_THRESHOLD
DEFAULT_SHELL_TOLERANCE = 80.0
# a diffusion-weighted acquisition whose largest b-value is at most this was written in ms/µm² (b = 1, 2, 3 for
# 1000, 2000, 3000 s/mm²); no diffusion MRI protocol has its largest b below 20 s/mm²
MAX_BVALUE_IN_MS_PER_UM2 = 20.0


@dataclass(frozen=True)
class Shell:
    """One cluster of b-values.

    Attributes
    ----------
    bvalue : float
        Mean b-value of the members (s/mm²).
    indices : ndarray of int
        Volume indices belonging to the shell.
    is_b0 : bool
        True for the b=0 shell.
    """

    bvalue: float
    indices: np.ndarray
    is_b0: bool

    @property
    def count(self) -> int:
        return int(self.indices.size)


def cluster_shells(
    bvals: np.ndarray,
    b0_threshold: float = DEFAULT_B0_THRESHOLD,
    tolerance: float = DEFAULT_SHELL_TOLERANCE,
) -> list[Shell]:
    """Group b-values into shells (single linkage on sorted values).

    Volumes with ``b <= b0_threshold`` form the b=0 shell. The others are sorted;
    a new shell starts wherever two consecutive b-values differ by more than
    ``tolerance``. This is the behaviour of MRtrix3's shell detection for
    ordinary schemes: 995/1000/1005 form one shell, 0.001-0.004 are b=0.

    Parameters
    ----------
    bvals : ndarray, shape (n,)
    b0_threshold : float
        Largest b-value counted as b=0 (s/mm²).
    tolerance : float
        Largest gap between consecutive sorted b-values inside one shell (s/mm²).

    Returns
    -------
    list of Shell
        Ordered by increasing b-value, the b=0 shell (if any) first.
    """
    bvals = np.asarray(bvals, dtype=float)
    if tolerance <= 0:
        raise DwiflowInputError(f"shell tolerance must be positive, got {tolerance}")
    shells: list[Shell] = []
    b0_idx = np.flatnonzero(bvals <= b0_threshold)
    if b0_idx.size:
        shells.append(Shell(float(bvals[b0_idx].mean()), b0_idx, True))
    dw_idx = np.flatnonzero(bvals > b0_threshold)
    if dw_idx.size:
        order = dw_idx[np.argsort(bvals[dw_idx], kind="stable")]
        sorted_b = bvals[order]
        breaks = np.flatnonzero(np.diff(sorted_b) > tolerance) + 1
        for members in np.split(order, breaks):
            members = np.sort(members)
            shells.append(Shell(float(bvals[members].mean()), members, False))
    return shells


def fsl_bvecs_to_world(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Convert FSL/BIDS b-vectors (voxel axes, FSL x-flip) into world coordinates.

    Parameters
    ----------
    bvecs : ndarray, shape (n, 3)
        Directions as read from a ``.bvec`` file (transposed to rows).
    affine : ndarray, shape (4, 4)
        The image's voxel-to-world matrix.

    Returns
    -------
    ndarray, shape (n, 3)
        Directions in world (scanner) coordinates; zero vectors stay zero.

    Notes
    -----
    FSL stores directions in the voxel axes of a radiologically ordered image:
    when ``det(affine[:3, :3]) > 0`` (neurological storage) the x component is
    negated. The rotation is the orthogonal polar factor of the 3x3 part, so
    voxel sizes and any shear are removed.
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DwiflowInputError("affine must be a finite 4x4 matrix")
    linear = affine[:3, :3]
    det = np.linalg.det(linear)
    if abs(det) < 1e-12:
        raise DwiflowInputError("affine is singular; cannot orient gradient directions")
    u, _, vt = np.linalg.svd(linear)
    rotation = u @ vt  # orthogonal polar factor, keeps the reflection of the affine
    voxel_dirs = np.array(bvecs, dtype=float, copy=True)
    if det > 0:
        voxel_dirs[:, 0] = -voxel_dirs[:, 0]
    return voxel_dirs @ rotation.T


def world_to_fsl_bvecs(directions: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fsl_bvecs_to_world`: world directions to FSL/BIDS bvecs."""
    affine = np.asarray(affine, dtype=float)
    linear = affine[:3, :3]
    u, _, vt = np.linalg.svd(linear)
    rotation = u @ vt
    voxel_dirs = np.asarray(directions, dtype=float) @ rotation
    if np.linalg.det(linear) > 0:
        voxel_dirs[:, 0] = -voxel_dirs[:, 0]
    return voxel_dirs


def as_rows_of_vectors(bvecs: np.ndarray, n_expected: int | None, name: str = "bvecs") -> np.ndarray:
    """Return b-vectors as an (n, 3) array from a 3×n (BIDS) or n×3 layout.

    A 3×n array is the BIDS layout. An n×3 array is accepted with a warning. When the
    layout cannot be decided (both dimensions 3), 3×n is assumed.
    """
    arr = np.asarray(bvecs, dtype=float)
    if arr.ndim == 1 and arr.size == 3:
        arr = arr.reshape(3, 1)
    if arr.ndim != 2 or 3 not in arr.shape:
        raise DwiflowInputError(
            f"{name}: expected 3 rows (one per axis) of directions, got an array of shape {arr.shape}"
        )
    if arr.shape[0] == 3 and (n_expected is None or arr.shape[1] == n_expected or arr.shape[1] != 3):
        return arr.T.copy()
    warnings.warn(
        f"{name}: directions are stored as {arr.shape[0]} rows x 3 columns; BIDS expects 3 rows. "
        "Reading them transposed.",
        stacklevel=2,
    )
    return arr.copy()


@dataclass
class GradientTable:
    """b-values and unit gradient directions (world frame) of a diffusion run.

    Build it with :func:`gradient_table`, which validates everything.

    Attributes
    ----------
    bvals : ndarray, shape (n,)
        b-values in s/mm².
    bvecs : ndarray, shape (n, 3)
        Unit directions in world coordinates; zero for b=0 volumes that had none.
    b0_threshold : float
    shell_tolerance : float
    """

    bvals: np.ndarray
    bvecs: np.ndarray
    b0_threshold: float = DEFAULT_B0_THRESHOLD
    shell_tolerance: float = DEFAULT_SHELL_TOLERANCE
    shells: list[Shell] = field(init=False)

    def __post_init__(self) -> None:
        self.shells = cluster_shells(self.bvals, self.b0_threshold, self.shell_tolerance)

    @property
    def n_volumes(self) -> int:
        return int(self.bvals.size)

    @property
    def b0s_mask(self) -> np.ndarray:
        """Boolean mask of the b=0 volumes."""
        return self.bvals <= self.b0_threshold

    @property
    def dw_shells(self) -> list[Shell]:
        """The non-zero shells."""
        return [s for s in self.shells if not s.is_b0]

    @property
    def shell_index(self) -> np.ndarray:
        """For each volume, the index into :attr:`shells` of its shell."""
        idx = np.empty(self.n_volumes, dtype=int)
        for i, shell in enumerate(self.shells):
            idx[shell.indices] = i
        return idx

    def find_shell(self, bvalue: float) -> Shell:
        """The shell whose mean b-value is within the tolerance of ``bvalue``."""
        if bvalue <= self.b0_threshold:
            for s in self.shells:
                if s.is_b0:
                    return s
        else:
            for s in self.dw_shells:
                if abs(s.bvalue - bvalue) <= self.shell_tolerance:
                    return s
        available = ", ".join(f"{s.bvalue:.0f}" for s in self.shells)
        raise DwiflowInputError(f"no shell at b={bvalue:g} s/mm²; shells present: {available}")

    def subset(self, indices: np.ndarray) -> "GradientTable":
        """A gradient table restricted to the given volumes."""
        return GradientTable(self.bvals[indices], self.bvecs[indices], self.b0_threshold, self.shell_tolerance)


def checked_gradient_table(gtab: Any, where: str) -> GradientTable:
    """``gtab`` when it is dwiflow's :class:`GradientTable`; otherwise a ``TypeError`` saying what to pass.

    A DIPY gradient table holds the directions of the ``.bvec`` file it was made from (the image's voxel axes):
    using them as dwiflow's world-frame directions would rotate every fibre, so it is converted explicitly, with
    :func:`gradient_table` and the image's affine.
    """
    if isinstance(gtab, GradientTable):
        return gtab
    if hasattr(gtab, "bvals") and hasattr(gtab, "bvecs"):
        raise TypeError(f"{where}: this is a DIPY gradient table, whose directions are in the image's voxel axes; "
                        "convert it with dwiflow.core.gradient_table(gtab, affine=img.affine) (or frame='world' if "
                        "its directions are world coordinates)")
    raise TypeError(f"{where}: expected a GradientTable (dwiflow.core.gradient_table), got {type(gtab).__name__}")


FRAMES = ("world", "fsl")
# a direction whose norm differs from 1 by more than this scales its volume's b-value (files hold 6 or more decimals)
UNIT_NORM_TOLERANCE = 1e-3


def gradient_table(
    bvals: np.ndarray | Any,
    bvecs: np.ndarray | None = None,
    *,
    affine: np.ndarray | None = None,
    frame: str | None = None,
    n_volumes: int | None = None,
    b0_threshold: float = DEFAULT_B0_THRESHOLD,
    shell_tolerance: float = DEFAULT_SHELL_TOLERANCE,
    bval_name: str = "bvals",
    bvec_name: str = "bvecs",
    image_name: str = "image",
) -> GradientTable:
    """Validate b-values and directions and build a :class:`GradientTable`.

    The frame of the directions must be said: FSL/BIDS ``.bvec`` files (and DIPY gradient tables built from
    them) hold directions in the image's voxel axes, x flipped for a positive-determinant affine (Jenkinson et
    al. 2012); dwiflow works in world coordinates, as MRtrix3 (Tournier et al. 2019). Taking one for the
    other silently rotates every fibre (on an oblique acquisition: a median 42° on bids_real sub-01), so
    there is no default.

    Parameters
    ----------
    bvals : array_like, shape (n,), or a DIPY ``GradientTable``
        b-values (s/mm²). A DIPY gradient table (``dipy.core.gradients.GradientTable``, or anything with
        ``bvals`` and ``bvecs`` arrays) gives both; its directions are those of the ``.bvec`` file it was
        made from, so ``affine`` is needed as for the file.
    bvecs : array_like, shape (3, n) or (n, 3)
        Directions. 3×n is the BIDS layout; n×3 is read with a warning. Omitted with a DIPY table. A direction
        whose norm differs from 1 by more than 1e-3 scales its volume's b-value by the squared norm (a scheme that
        encodes b-values in the gradients' lengths), as MRtrix3 reads such files, with a warning.
    affine : ndarray (4, 4)
        The DWI's voxel-to-world matrix (``nibabel.load(dwi).affine``): ``bvecs`` are FSL/BIDS vectors and
        are converted into world coordinates. Give this or ``frame="world"``.
    frame : {"world", "fsl"}, optional
        ``"world"``: ``bvecs`` are world (scanner) coordinates already (MRtrix3's ``-grad`` table, simulated
        schemes); no affine. ``"fsl"``: FSL/BIDS vectors, which need ``affine``; the same as giving only
        ``affine``.
    n_volumes : int, optional
        Number of volumes of the DWI, checked against the b-value count.
    b0_threshold, shell_tolerance : float
        See :func:`cluster_shells`.
    bval_name, bvec_name, image_name : str
        Names used in error messages (usually the file names).

    Returns
    -------
    GradientTable

    Raises
    ------
    DwiflowInputError
        Counts that disagree, non-finite or negative values, a b>0 volume
        without a direction, or a frame that is not said.

    Examples
    --------
    >>> from dwiflow.tasks.io import read_bvals, read_bvecs                       # doctest: +SKIP
    >>> img = nibabel.load("sub-01_dwi.nii.gz")                                   # doctest: +SKIP
    >>> gtab = gradient_table(read_bvals("sub-01_dwi.bval"), read_bvecs("sub-01_dwi.bvec"),
    ...                       affine=img.affine)                                    # doctest: +SKIP
    >>> gtab = gradient_table(dipy_gtab, affine=img.affine)                         # doctest: +SKIP
    """
    for given, name in ((bvals, "bvals"), (bvecs, "bvecs")):
        if isinstance(given, (str, os.PathLike)):  # DIPY's gradient_table reads file names; the core reads no file
            raise DwiflowInputError(f"{name}: got the file name {str(given)!r}; dwiflow.core works on arrays: read the "
                                    "files with dwiflow.tasks.io.read_bvals / read_bvecs (or numpy.loadtxt) first",
                                    parameters=(name,))
    if bvecs is None and hasattr(bvals, "bvals") and hasattr(bvals, "bvecs"):  # a DIPY GradientTable
        dipy_table = bvals
        bvals, bvecs = np.asarray(dipy_table.bvals, dtype=float), np.asarray(dipy_table.bvecs, dtype=float).T
        if b0_threshold == DEFAULT_B0_THRESHOLD and getattr(dipy_table, "b0_threshold", None) is not None:
            b0_threshold = float(dipy_table.b0_threshold)
    elif bvecs is None:
        raise DwiflowInputError(f"{bvec_name}: no directions given (pass bvecs, or a DIPY GradientTable as the "
                                "first argument)", parameters=("bvecs",))
    if frame is not None and frame not in FRAMES:
        raise DwiflowInputError(f"frame must be one of {', '.join(map(repr, FRAMES))}, got {frame!r}",
                                parameters=("frame",))
    if frame == "fsl" and affine is None:
        raise DwiflowInputError("frame='fsl' needs affine=<the DWI's affine> to turn the vectors into world "
                                "coordinates", parameters=("frame", "affine"))
    if frame == "world" and affine is not None:
        raise DwiflowInputError("frame='world' takes no affine: the affine converts FSL/BIDS vectors (frame='fsl')",
                                parameters=("frame", "affine"))
    if affine is None and frame != "world":
        raise DwiflowInputError(
            f"{bvec_name}: say which frame the directions are in: affine=<the DWI's affine> for FSL/BIDS .bvec "
            "vectors (and DIPY gradient tables made from them), or frame='world' for world (scanner) coordinates",
            parameters=("affine", "frame"))
    bvals_arr = np.asarray(bvals, dtype=float).ravel()
    if bvals_arr.size == 0:
        raise DwiflowInputError(f"{bval_name}: no b-values found")
    if not np.all(np.isfinite(bvals_arr)):
        raise DwiflowInputError(f"{bval_name}: contains non-finite b-values")
    if np.any(bvals_arr < 0):
        raise DwiflowInputError(f"{bval_name}: contains negative b-values")
    largest = float(bvals_arr.max())
    if 0.05 < largest <= MAX_BVALUE_IN_MS_PER_UM2:
        raise DwiflowInputError(
            f"{bval_name}: the largest b-value is {largest:g}: these look like ms/µm² (b=1 means 1000 s/mm²); "
            "dwiflow reads b-values in s/mm² as BIDS does: multiply them by 1000", parameters=("bvals",))
    if b0_threshold < 0:
        raise DwiflowInputError(f"b0_threshold must be >= 0, got {b0_threshold}")
    vecs = as_rows_of_vectors(bvecs, bvals_arr.size, bvec_name)
    if vecs.shape[0] != bvals_arr.size:
        raise DwiflowInputError(
            f"{bval_name} has {bvals_arr.size} b-values but {bvec_name} has {vecs.shape[0]} directions"
        )
    if n_volumes is not None and n_volumes != bvals_arr.size:
        raise DwiflowInputError(
            f"{image_name} has {n_volumes} volumes but {bval_name} has {bvals_arr.size} b-values"
        )
    if not np.all(np.isfinite(vecs)):
        raise DwiflowInputError(f"{bvec_name}: contains non-finite values")
    norms = np.linalg.norm(vecs, axis=1)
    off_unit = (norms >= 1e-6) & (np.abs(norms - 1) > UNIT_NORM_TOLERANCE)
    if off_unit.any():
        # a scheme that encodes b-values in the vectors' lengths (one nominal b-value, scaled gradients): the b-value
        # of a volume is the nominal one times the squared norm, as MRtrix3 reads it (its -bvalue_scaling default)
        weighted = np.flatnonzero(off_unit & (bvals_arr > b0_threshold))
        example = int(weighted[0] if weighted.size else np.flatnonzero(off_unit)[0])
        nominal = bvals_arr[example]
        bvals_arr = np.where(norms >= 1e-6, bvals_arr * norms ** 2, bvals_arr)
        warnings.warn(f"{bvec_name}: {int(off_unit.sum())} of the directions are not unit vectors (norms "
                      f"{norms[off_unit].min():.3g} to {norms[off_unit].max():.3g}): their b-values are scaled by "
                      f"the squared norm, as MRtrix3 does (volume {example}: b={nominal:g} becomes "
                      f"{bvals_arr[example]:.4g})", stacklevel=2)
    dw = bvals_arr > b0_threshold
    missing = np.flatnonzero(dw & (norms < 1e-6))
    if missing.size:
        raise DwiflowInputError(
            f"{bvec_name}: volume(s) {missing[:5].tolist()} have b>{b0_threshold:g} but a zero direction"
        )
    unit = np.zeros_like(vecs)
    nonzero = norms >= 1e-6
    unit[nonzero] = vecs[nonzero] / norms[nonzero, None]
    if affine is not None:
        unit = fsl_bvecs_to_world(unit, affine)
    return GradientTable(bvals_arr, unit, b0_threshold, shell_tolerance)
