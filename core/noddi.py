"""NODDI (Zhang et al. 2012) fitted as AMICO does (Daducci et al. 2015): a linear dictionary and sparse fits.

The signal of a voxel, divided by its mean b=0 signal, is modelled as a non-negative combination of atoms: for each
orientation dispersion OD on a grid and each intra-cellular volume fraction v on a grid, the NODDI signal of a
Watson distribution of sticks (diffusivity ``d_par``) with fraction v plus the hindered extra-cellular signal of the
same distribution (tortuosity: perpendicular diffusivity ``d_par (1 - v)``), all along the voxel's principal tensor
direction; and an isotropic atom (diffusivity ``d_iso``). As AMICO 2.x:

1. the principal direction is that of an ordinary least-squares tensor fit of the normalised signal;
2. NNLS on the whole dictionary gives the isotropic weight;
3. a non-negative elastic net (ℓ1 weight ``lambda1`` = 0.5, ℓ2 weight ``lambda2`` = 1e-3, SPAMS' formulation) of the
   diffusion-weighted signal less the isotropic part, on the anisotropic atoms scaled to unit norm, selects atoms;
4. NNLS on the selected atoms and the isotropic one gives the weights; NDI is the weighted mean of v over the
   anisotropic atoms, ODI = 2/π·atan(1/κ̄) with κ̄ the weighted mean of the atoms' Watson concentrations
   κ = 1/tan(π·OD/2), and the free-water fraction is the isotropic weight over the sum of all weights.

The atoms are even Legendre series in the cosine between gradient and fibre direction, truncated at degree
``lmax`` (12, AMICO's): the Watson-dispersed stick by the Funk–Hecke theorem (the product of the Watson density's and
the stick's Legendre coefficients, computed by Gauss–Legendre quadrature, as the NODDI toolbox's series), the
hindered compartment as the projection of its signal (its diffusivities are the Watson average of the zeppelin's).
Where AMICO rotates atoms to the nearest of 500 tabulated directions, the atoms here are evaluated along the voxel's
own direction, and the ℓ1 scaling uses each atom's norm averaged over all orientations (AMICO: along its first
tabulated direction).

References
----------
Zhang H., Schneider T., Wheeler-Kingshott C.A., Alexander D.C. NODDI: practical in vivo neurite orientation
dispersion and density imaging of the human brain. NeuroImage 61 (2012) 1000-1016.
Daducci A., Canales-Rodríguez E.J., Zhang H., Dyrby T.B., Alexander D.C., Thiran J.-P. Accelerated microstructure
imaging via convex optimization (AMICO) from diffusion MRI data. NeuroImage 105 (2015) 32-44.
Mairal J., Bach F., Ponce J., Sapiro G. Online learning for matrix factorization and sparse coding. J Mach Learn
Res 11 (2010) 19-60 (SPAMS' elastic-net formulation).
Bro R., De Jong S. A fast non-negativity-constrained least squares algorithm. J Chemometrics 11 (1997) 393-401.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable, checked_gradient_table
from dwiflow.core.status import FitStatus
from dwiflow.core.tensor import MIN_POSITIVE_SIGNAL, lower_triangular_to_matrix, tensor_design_matrix
from dwiflow.core.voxels import VoxelBatch, scatter

D_PAR, D_ISO = 1.7e-3, 3.0e-3  # mm²/s, AMICO's defaults (in vivo)
ICVF_GRID = tuple(np.linspace(0.1, 0.99, 12))
OD_GRID = (0.03, 0.06) + tuple(np.linspace(0.09, 0.99, 10))
LAMBDA1, LAMBDA2 = 0.5, 1e-3
LMAX = 12
STATUS_CODES = (FitStatus.OK, FitStatus.NONFINITE_INPUT, FitStatus.NO_SIGNAL, FitStatus.SINGULAR)
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(200)


def _legendre_table(x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """P_l(x) for every x (rows) and degree (columns)."""
    from numpy.polynomial import legendre

    return np.stack([legendre.legval(x, np.eye(int(d) + 1)[int(d)]) for d in degrees], axis=1)


_EVEN = np.arange(0, LMAX + 1, 2)
_P_NODES = _legendre_table(_NODES, _EVEN)


def watson_concentration(od: np.ndarray) -> np.ndarray:
    """Watson κ of an orientation dispersion index, κ = 1/tan(π·OD/2) (Zhang et al. 2012)."""
    return 1.0 / np.tan(np.asarray(od, dtype=float) * np.pi / 2.0)


def _watson_moments(kappa: float) -> tuple[np.ndarray, float]:
    """The Watson density's Legendre coefficients 2π∫w(x)P_l(x)dx (even l ≤ LMAX; w normalised on the sphere) and
    its second moment ⟨(μ·n)²⟩."""
    density = np.exp(kappa * (_NODES ** 2 - 1.0))  # e^{κx²} scaled for range; the scale cancels
    total = _WEIGHTS @ density
    return (_WEIGHTS * density) @ _P_NODES / total, float((_WEIGHTS * density) @ _NODES ** 2 / total)


def _projection(values: np.ndarray) -> np.ndarray:
    """Even Legendre coefficients (degree ≤ LMAX) of a zonal function given at the quadrature nodes (rows)."""
    return ((values * _WEIGHTS) @ _P_NODES) * (2 * _EVEN + 1) / 2.0


def atom_series(bvalues: np.ndarray, kappa: float, icvf: float, d_par: float = D_PAR) -> np.ndarray:
    """(shells, even Legendre terms) series of one anisotropic atom: icvf × Watson-dispersed stick + (1 - icvf) ×
    hindered compartment, at each b-value."""
    watson, second_moment = _watson_moments(kappa)
    d_perp = d_par * (1.0 - icvf)
    hindered_par = d_perp + (d_par - d_perp) * second_moment
    hindered_perp = d_perp + (d_par - d_perp) * (1.0 - second_moment) / 2.0
    out = np.empty((bvalues.size, _EVEN.size))
    for index, b in enumerate(bvalues):
        stick = 2.0 * np.pi * ((_WEIGHTS * np.exp(-b * d_par * _NODES ** 2)) @ _P_NODES)
        intra = (2 * _EVEN + 1) / (4.0 * np.pi) * watson * stick
        extra = _projection(np.exp(-b * (hindered_perp + (hindered_par - hindered_perp) * _NODES ** 2)))
        out[index] = icvf * intra + (1.0 - icvf) * extra
    return out


@dataclass
class NoddiFit:
    """NODDI maps of the voxels in ``mask``: neurite density (``ndi``, ICVF), orientation dispersion (``odi``), free
    water (``fwf``, ISOVF), the fibre direction used (``direction``, world frame) and the status."""

    ndi: np.ndarray
    odi: np.ndarray
    fwf: np.ndarray
    direction: np.ndarray
    status: np.ndarray
    mask: np.ndarray

    @property
    def icvf(self) -> np.ndarray:
        """The intra-cellular volume fraction: ``ndi`` by the name QSIRecon's and NODDI's maps use."""
        return self.ndi

    @property
    def isovf(self) -> np.ndarray:
        """The isotropic volume fraction: ``fwf`` by the name QSIRecon's and NODDI's maps use."""
        return self.fwf


class NoddiModel:
    """NODDI as AMICO fits it (see the module docstring).

    Parameters
    ----------
    gtab : GradientTable
        Needs b=0 volumes (the signal is normalised by their mean) and at least two diffusion-weighted shells.
    d_par, d_iso : float
        Intrinsic parallel diffusivity of neurites and the isotropic diffusivity (mm²/s).
    icvf_grid, od_grid : sequences of float
        The dictionary's intra-cellular fractions and orientation dispersion indices.
    lambda1, lambda2 : float
        Weights of the elastic net's ℓ1 and ℓ2 penalties.
    """

    def __init__(self, gtab: GradientTable, d_par: float = D_PAR, d_iso: float = D_ISO,
                 icvf_grid=ICVF_GRID, od_grid=OD_GRID, lambda1: float = LAMBDA1, lambda2: float = LAMBDA2) -> None:
        gtab = checked_gradient_table(gtab, "NoddiModel")
        if not gtab.b0s_mask.any():
            raise DwiflowInputError("NODDI needs b=0 volumes: the signal is normalised by their mean")
        dw = ~gtab.b0s_mask
        shells = sorted({round(float(b)) for b in gtab.bvals[dw]})
        if len({round(b / 100) for b in shells}) < 2:
            raise DwiflowInputError("NODDI needs at least two diffusion-weighted shells (one shell cannot separate "
                                    f"the intra- from the extra-neurite signal); this run has b={shells}")
        for name, value in (("d_par", d_par), ("d_iso", d_iso)):
            if not 0 < value < 5e-3:
                raise DwiflowInputError(f"{name} must be in (0, 5e-3) mm²/s, got {value!r}", parameters=(name,))
        self.gtab, self.d_par, self.d_iso = gtab, float(d_par), float(d_iso)
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.icvf_grid = np.asarray(icvf_grid, dtype=float)
        self.od_grid = np.asarray(od_grid, dtype=float)
        bvalues = np.array([0.0] + [float(b) for b in shells])
        self.shell_of = np.array([0 if b0 else 1 + shells.index(round(float(b)))
                                  for b, b0 in zip(gtab.bvals, gtab.b0s_mask)], dtype=np.int64)
        kappas, icvfs, series = [], [], []
        for od in self.od_grid:  # AMICO's atom order: dispersion outer, fraction inner
            kappa = float(watson_concentration(od))
            for icvf in self.icvf_grid:
                series.append(atom_series(bvalues, kappa, float(icvf), self.d_par))
                kappas.append(kappa)
                icvfs.append(float(icvf))
        self.coefficients = np.ascontiguousarray(np.stack(series, axis=2))  # (shells, terms, atoms)
        self.coefficients[0] = 0.0
        self.coefficients[0, 0] = 1.0  # b=0: every atom is 1
        self.isotropic = np.exp(-bvalues * self.d_iso)
        self.kappa = np.array(kappas)
        self.icvf = np.array(icvfs)
        self.dwi_rows = np.flatnonzero(dw).astype(np.int64)
        # each atom's squared norm over the diffusion-weighted volumes, averaged over orientations (Legendre
        # orthogonality: the mean of P_l² over the sphere is 1/(2l+1))
        squared = (self.coefficients[self.shell_of[self.dwi_rows]] ** 2 / (2 * _EVEN + 1)[None, :, None]).sum((0, 1))
        self.norms = 1.0 / np.sqrt(squared)
        self._tensor_pinv = np.linalg.pinv(tensor_design_matrix(gtab))  # the OLS tensor giving each direction

    def _principal_directions(self, normalised: np.ndarray) -> np.ndarray:
        """Principal eigenvectors of ordinary least-squares tensor fits of normalised signals (as AMICO, with
        DIPY's OLS: samples below 1e-4 raised to it)."""
        elements = np.log(np.maximum(normalised, MIN_POSITIVE_SIGNAL)) @ self._tensor_pinv.T
        tensors = lower_triangular_to_matrix(elements[:, :6])
        finite = np.all(np.isfinite(tensors), axis=(1, 2))
        _, vectors = np.linalg.eigh(np.where(finite[:, None, None], tensors, np.eye(3)))
        return np.where(finite[:, None], vectors[:, :, -1], np.nan)  # eigh sorts ascending: the largest is last

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, n_threads: int | None = None,
            progress=None, chunk_size: int = 16384) -> NoddiFit:
        """Fit every voxel of ``data`` (…, volumes) in ``mask``; ``progress(done, total)`` after each chunk."""
        from numba import get_num_threads

        from dwiflow.core._noddi_kernel import fit_voxels

        batch = VoxelBatch.from_volume(data, mask, self.gtab.n_volumes)
        n = batch.n_voxels
        threads = int(n_threads or get_num_threads())
        ndi, odi, fwf = (np.full(n, np.nan) for _ in range(3))
        directions = np.full((n, 3), np.nan)
        status = np.zeros(n, dtype=np.uint8)
        gradients = np.ascontiguousarray(self.gtab.bvecs, dtype=float)
        b0 = self.gtab.b0s_mask
        for start in range(0, n, chunk_size):
            chunk = slice(start, min(start + chunk_size, n))
            signal = batch.signal(chunk)
            finite = np.all(np.isfinite(signal), axis=1)
            mean_b0 = np.where(finite, signal[:, b0].mean(axis=1), 0.0)
            usable = finite & (mean_b0 > 0)
            part = status[chunk]
            part[~finite] = FitStatus.NONFINITE_INPUT
            part[finite & ~usable] = FitStatus.NO_SIGNAL
            normalised = np.where(usable[:, None], signal, 0.0) / np.where(usable, mean_b0, 1.0)[:, None]
            normalised = np.maximum(normalised, 0.0)
            principal = self._principal_directions(normalised)
            good = usable & np.all(np.isfinite(principal), axis=1)
            part[usable & ~good] = FitStatus.SINGULAR
            status[chunk] = part
            if good.any():
                values = fit_voxels(np.ascontiguousarray(normalised[good]), np.ascontiguousarray(principal[good]),
                                    gradients, self.shell_of, self.coefficients, self.isotropic, self.dwi_rows,
                                    self.norms, self.icvf, self.kappa, self.lambda1, self.lambda2, threads)
                index = np.arange(chunk.start, chunk.stop)[good]
                ndi[index], odi[index], fwf[index] = values.T
                directions[index] = principal[good]
            if progress is not None:
                progress(chunk.stop, n)
        return NoddiFit(ndi=scatter(ndi, batch), odi=scatter(odi, batch), fwf=scatter(fwf, batch),
                        direction=scatter(directions, batch), status=scatter(status, batch), mask=batch.mask)
