"""Stage functions: files in → core → files out (+ JSON sidecars).

Each function is what one ``dwirecon`` subcommand runs and what the Pydra task of that
stage wraps. Outputs are written atomically (all or nothing) with sidecars whose text
comes from ``bids_specs/outputs.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dwiflow._version import __version__
from dwiflow.bids_specs.outputs import output_filename, sidecar
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import DEFAULT_B0_THRESHOLD, cluster_shells, world_to_fsl_bvecs
from dwiflow.core.mask import median_otsu_mask
from dwiflow.core.sims import acquisition_scheme, make_phantom
from dwiflow.core.tensor import MIN_POSITIVE_SIGNAL, TensorModel
from dwiflow.core.response import (
    ResponseFunction,
    amp2response,
    fa_response_voxels,
    mask_for_response_ssst,
    response_from_mask_ssst,
    tensor_response_zonal,
)
from dwiflow.tasks.io import (
    atomic_outputs,
    existing_file,
    load_dwi,
    load_image,
    load_mask,
    read_bvals,
    read_sidecar,
    sidecar_path,
)

PathLike = str | os.PathLike


def _provenance(*sources: PathLike | None) -> dict[str, Any]:
    # file names only: outputs must not depend on where inputs or the workflow cache live
    return {
        "Sources": [Path(s).name for s in sources if s is not None],
        "GeneratedBy": [{"Name": "dwiflow", "Version": __version__}],
    }


def shells_of(bval: PathLike, b0_threshold: float = DEFAULT_B0_THRESHOLD) -> list[tuple[float, int]]:
    """Shells of a ``.bval`` file as (mean b-value, volume count), b=0 first."""
    return [(s.bvalue, s.count) for s in cluster_shells(read_bvals(bval), b0_threshold)]


def mask_stage(dwi: PathLike, bval: PathLike, bvec: PathLike, out: PathLike) -> Path:
    """Brain mask (median-Otsu on the mean b=0) written to ``out``."""
    run = load_dwi(dwi, bval, bvec)
    mask = median_otsu_mask(run.data, run.gtab)
    with atomic_outputs() as outputs:
        outputs.nifti(
            out,
            mask.astype(np.uint8),
            run.affine,
            sidecar("brain_mask", **_provenance(dwi, bval, bvec), VoxelCount=int(mask.sum())),
            dtype=np.uint8,
        )
    return Path(out)


TENSOR_OUTPUTS = ("fa", "md", "ad", "rd", "v1", "s0", "evals", "status")


def tensor_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    outputs: dict[str, PathLike],
    mask: PathLike | None = None,
    fit_method: str = "WLS",
) -> dict[str, Path]:
    """Fit the tensor and write the requested maps.

    Parameters
    ----------
    outputs : dict
        Map name (one of :data:`TENSOR_OUTPUTS`) → output path.
    mask : path, optional
        Brain mask; without one every voxel with a finite, positive signal is fitted.
    """
    _check_outputs("tensor", outputs, TENSOR_OUTPUTS)
    run = load_dwi(dwi, bval, bvec)
    voxels = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else _voxels_with_signal(run, dwi)
    fit = TensorModel(run.gtab, fit_method=fit_method).fit(run.data, voxels)
    maps = {
        "fa": fit.fa, "md": fit.md, "ad": fit.ad, "rd": fit.rd, "v1": fit.v1,
        "s0": fit.s0, "evals": fit.evals, "status": fit.status,
    }
    parameters = {"FitMethod": fit_method, "MinSignal": MIN_POSITIVE_SIGNAL}
    written: dict[str, Path] = {}
    with atomic_outputs() as out:
        for name, path in outputs.items():
            dtype = np.uint8 if name == "status" else np.float32
            content = sidecar(f"tensor_{name}", parameters, **_provenance(dwi, bval, bvec, mask))
            written[name] = out.nifti(path, maps[name], run.affine, content, dtype=dtype)
    return written


def _voxels_with_signal(run, dwi: PathLike) -> np.ndarray:
    """Without a mask, every voxel with some positive signal is fitted (as MRtrix3 does)."""
    voxels = np.any(np.nan_to_num(run.data) > 0, axis=-1)
    if not voxels.any():
        raise DwiflowInputError(f"DWI {dwi} has no voxel with a positive signal")
    return voxels


def _brain_mask(run, mask: PathLike | None) -> np.ndarray:
    if mask is not None:
        return load_mask(mask, run.data.shape[:3], run.affine)
    return median_otsu_mask(run.data, run.gtab)


def load_fibre_directions(path: PathLike, spatial_shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A 4D image whose first three volumes are per-voxel fibre directions (world frame)."""
    img = load_image(path, "directions image")
    if len(img.shape) != 4 or img.shape[3] < 3:
        raise DwiflowInputError(f"directions image {path} must be 4D with at least 3 volumes, got shape {img.shape}")
    if tuple(img.shape[:3]) != tuple(spatial_shape):
        raise DwiflowInputError(f"directions image {path} has spatial shape {img.shape[:3]} but the DWI has {tuple(spatial_shape)}")
    if not np.allclose(img.affine, affine, atol=1e-3):
        raise DwiflowInputError(f"directions image {path} is not on the DWI's voxel grid (affines differ)")
    return np.asarray(img.dataobj[..., :3], dtype=float)


def read_direction_file(path: PathLike, n_volumes: int) -> np.ndarray:
    """External directions: N×3 unit vectors, or N×2 [azimuth, elevation] in radians (MRtrix3)."""
    from dwiflow.core.sh import sphere_to_cart

    p = existing_file(path, "directions")
    try:
        values = np.loadtxt(p, ndmin=2, comments="#")
    except Exception as exc:
        raise DwiflowInputError(f"cannot read directions from {p}: {exc}") from None
    if values.shape[1] == 2:
        values = sphere_to_cart(values[:, 1], values[:, 0])
    if values.shape != (n_volumes, 3):
        raise DwiflowInputError(f"directions file {p} has {values.shape[0]} rows of {values.shape[1]} values; "
                                f"expected {n_volumes} rows (one per volume) of 3 (x y z) or 2 (azimuth elevation)")
    return values


def _response_sidecar(response: ResponseFunction, method: str, parameters: dict[str, Any], *sources) -> dict[str, Any]:
    return {
        "Description": f"Response function (zonal SH per shell, MRtrix3 convention) estimated by {method}",
        "Method": method,
        "Parameters": parameters,
        "Shells": [float(b) for b in response.bvalues],
        "Lmax": [int(l) for l in response.lmax],
        "ResponseFunction": {"Coefficients": response.coefficients.tolist(), "Type": "zonal"},
        **_provenance(*sources),
    }


def _write_response(
    out_txt: PathLike,
    response: ResponseFunction,
    content: dict[str, Any],
    affine: np.ndarray,
    voxels: np.ndarray | None = None,
    voxels_out: PathLike | None = None,
    method: str = "",
) -> Path:
    """Response text + sidecar, and optionally the selected-voxel mask, all or nothing."""
    with atomic_outputs() as out:
        out.text(out_txt, response.to_text())
        out.json(sidecar_path(out_txt), content)
        if voxels_out is not None and voxels is not None:
            out.nifti(voxels_out, voxels.astype(np.uint8), affine,
                      {"Description": f"Voxels selected for the {method} response", "VoxelCount": int(voxels.sum())},
                      dtype=np.uint8)
    return Path(out_txt)


def amp2response_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    mask: PathLike,
    directions_image: PathLike,
    out_txt: PathLike,
    *,
    shells: list[float] | None = None,
    lmax: list[int] | None = None,
    isotropic: bool = False,
    constrained: bool = True,
    directions_file: PathLike | None = None,
) -> Path:
    """MRtrix3-style amp2response from a single-fibre mask and a fibre-direction image."""
    if directions_file is not None:
        img = load_image(dwi, "amplitude image")
        if len(img.shape) != 4:
            raise DwiflowInputError(f"amplitude image {dwi} must be 4D, got shape {img.shape}")
        data, affine = np.asarray(img.dataobj, dtype=float), img.affine
        ext_dirs, gtab = read_direction_file(directions_file, img.shape[3]), None
    else:
        run = load_dwi(dwi, bval, bvec)
        data, affine, gtab, ext_dirs = run.data, run.affine, run.gtab, None
    voxels = load_mask(mask, data.shape[:3], affine)
    fibres = load_fibre_directions(directions_image, data.shape[:3], affine)
    response = amp2response(
        np.asarray(data[voxels], dtype=float), fibres[voxels], gtab, directions=ext_dirs,
        shells=shells, lmax=lmax, isotropic=isotropic, constrained=constrained,
    )
    params = {"Shells": shells, "Lmax": lmax, "Isotropic": isotropic, "Constrained": constrained,
              "Voxels": int(voxels.sum())}
    return _write_response(out_txt, response, _response_sidecar(response, "amp2response", params, dwi, mask,
                                                                directions_image), affine)


def fa_response_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    out_txt: PathLike,
    *,
    mask: PathLike | None = None,
    voxels_out: PathLike | None = None,
    number: int = 300,
    erode: int = 3,
    shells: list[float] | None = None,
    lmax: list[int] | None = None,
) -> Path:
    """MRtrix3 ``dwi2response fa``: top-FA voxels of the eroded mask, then amp2response.

    As MRtrix3 does, the response is estimated on the largest b-value shell only unless
    ``shells`` says otherwise.
    """
    run = load_dwi(dwi, bval, bvec)
    brain = _brain_mask(run, mask)
    voxels, v1, _ = fa_response_voxels(run.data, run.gtab, brain, erode=erode, number=number)
    if shells is None:
        if not run.gtab.dw_shells:
            raise DwiflowInputError(f"{bval} has no diffusion-weighted shell")
        shells = [run.gtab.dw_shells[-1].bvalue]
    response = amp2response(np.asarray(run.data[voxels], dtype=float), v1[voxels], run.gtab, shells=shells, lmax=lmax)
    params = {"Number": number, "Erode": erode, "Shells": shells, "Lmax": lmax, "Voxels": int(voxels.sum())}
    content = _response_sidecar(response, "fa (MRtrix3 dwi2response fa)", params, dwi, mask)
    return _write_response(out_txt, response, content, run.affine, voxels, voxels_out, "fa")


def ssst_response_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    out_txt: PathLike,
    *,
    roi_radii: int | tuple[int, int, int] = 10,
    roi_center: tuple[int, int, int] | None = None,
    fa_threshold: float = 0.7,
    mask: PathLike | None = None,
    voxels_out: PathLike | None = None,
) -> Path:
    """DIPY ``auto_response_ssst``: FA-thresholded central ROI, mean eigenvalues and S0.

    Also writes the same tensor response as zonal SH for every shell (lmax 10, 0 at b=0).
    """
    run = load_dwi(dwi, bval, bvec)
    brain = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else None
    voxels = mask_for_response_ssst(run.data, run.gtab, roi_center, roi_radii, fa_threshold, brain)
    ssst = response_from_mask_ssst(run.data, run.gtab, voxels)
    lmaxes = [0 if s.is_b0 else 10 for s in run.gtab.shells]
    response = tensor_response_zonal(ssst.evals, ssst.s0, np.array([s.bvalue for s in run.gtab.shells]), lmaxes)
    params = {"RoiRadii": roi_radii, "RoiCenter": roi_center, "FaThreshold": fa_threshold}
    content = _response_sidecar(response, "ssst (DIPY auto_response_ssst)", params, dwi, mask)
    content.update({"Eigenvalues": ssst.evals.tolist(), "S0": ssst.s0, "VoxelCount": ssst.n_voxels,
                    "EigenvalueRatio": ssst.ratio})
    return _write_response(out_txt, response, content, run.affine, voxels, voxels_out, "SSST")


def iterative_response_stage(
    method: str,
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    out_txt: PathLike,
    *,
    mask: PathLike | None = None,
    voxels_out: PathLike | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Tournier (MRtrix3 ``dwi2response tournier``) or Tax (DIPY ``recursive_response``) response."""
    from dwiflow.core.response_iterative import tax_response, tournier_response

    options = dict(options or {})
    run = load_dwi(dwi, bval, bvec)
    if method == "tournier":
        result = tournier_response(run.data, run.gtab, _brain_mask(run, mask), **options)
        label = "tournier (MRtrix3 dwi2response tournier)"
    elif method == "tax":
        wm = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else None
        result = tax_response(run.data, run.gtab, wm, **options)
        label = "tax (recursive calibration, DIPY recursive_response)"
    else:
        raise DwiflowInputError(f"unknown iterative response method {method!r}")
    params = {**options, "Iterations": result.iterations, "Converged": result.converged,
              "Voxels": int(result.voxels.sum())}
    content = _response_sidecar(result.response, label, params, dwi, mask)
    return _write_response(out_txt, result.response, content, run.affine, result.voxels, voxels_out, method)


def load_response(path: PathLike) -> ResponseFunction:
    """A response in MRtrix3's text format."""
    p = existing_file(path, "response")
    return ResponseFunction.from_text(p.read_text(), str(p))


def load_sh_image(path: PathLike, what: str = "FOD"):
    """A 4D SH image; the volume count must be an even-degree SH coefficient count."""
    from dwiflow.core.sh import lmax_from_n_coefficients

    img = load_image(path, what)
    if len(img.shape) != 4:
        raise DwiflowInputError(f"{what} {path} must be a 4D SH image, got shape {img.shape}")
    try:
        lmax = lmax_from_n_coefficients(img.shape[3])
    except DwiflowInputError:
        raise DwiflowInputError(
            f"{what} {path} has {img.shape[3]} volumes, which is not an even-degree SH coefficient count "
            "(1, 6, 15, 28, 45, 66, ...): is it an SH image?"
        ) from None
    return np.asarray(img.dataobj, dtype=float), img.affine, lmax


def csd_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    response: PathLike,
    out_fod: PathLike,
    *,
    mask: PathLike | None = None,
    lmax: int | None = None,
    shell: float | None = None,
    neg_lambda: float = 1.0,
    threshold: float = 0.0,
    niter: int = 50,
    status_out: PathLike | None = None,
) -> Path:
    """Constrained spherical deconvolution: FOD as SH (MRtrix3 basis, world frame) + sidecar."""
    from dwiflow.core.csd import CsdModel

    run = load_dwi(dwi, bval, bvec)
    resp = load_response(response)
    model = CsdModel(run.gtab, resp, lmax=lmax, shell=shell, neg_lambda=neg_lambda, threshold=threshold, niter=niter)
    voxels = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else _voxels_with_signal(run, dwi)
    fit = model.fit(run.data, voxels)
    zonal = model.zonal
    params = {"Lmax": model.lmax, "Shell": model.shell.bvalue, "NegLambda": neg_lambda, "NormLambda": 1.0,
              "Threshold": threshold, "MaxIterations": niter, "ConstraintDirections": int(model.constraint_dirs.shape[0]),
              "VoxelsNotConverged": int((fit.status == 2).sum()), "VoxelsFailed": int((fit.status != 0).sum())}
    content = sidecar("csd_fod", params, {"SphericalHarmonicDegree": model.lmax}, **_provenance(dwi, bval, bvec, response, mask),
                      ResponseFunction={"Coefficients": [float(c) for c in zonal], "Type": "zonal",
                                        "Shell": model.shell.bvalue},
                      PointSpreadFunction={"Coefficients": [float(c) for c in model.point_spread_function()],
                                           "Type": "zonal",
                                           "Description": "the FOD of one noiseless fibre along z (the response "
                                                          "deconvolved); the peaks stage subtracts it at each peak"})
    with atomic_outputs() as out:
        out.nifti(out_fod, fit.sh, run.affine, content)
        if status_out is not None:
            out.nifti(status_out, fit.status, run.affine, sidecar("csd_status", params), dtype=np.uint8)
    return Path(out_fod)


def _check_outputs(model: str, outputs: dict[str, PathLike], allowed: tuple[str, ...]) -> None:
    unknown = set(outputs) - set(allowed)
    if unknown:
        raise DwiflowInputError(f"unknown {model} outputs {sorted(unknown)}; choose from {allowed}")
    if not outputs:
        raise DwiflowInputError(f"no output requested; give at least one of {', '.join(allowed)}")


def _write_model_maps(
    prefix: str,
    outputs: dict[str, PathLike],
    volume_of,
    affine: np.ndarray,
    params: dict[str, Any],
    sources: dict[str, Any],
    status_levels: dict[int, str],
    orientation: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """One NIfTI + sidecar per requested map of a model (``<prefix>_<name>`` in outputs.yaml), all or nothing.

    ``volume_of(name)`` gives the map's image; ``status`` is written as uint8 with the model's levels.
    """
    written: dict[str, Path] = {}
    with atomic_outputs() as out:
        for name, path in outputs.items():
            content = sidecar(f"{prefix}_{name}", params, (orientation or {}).get(name), **sources)
            if name == "status":
                content["Levels"] = {str(k): v for k, v in status_levels.items()}
            dtype = np.uint8 if name == "status" else np.float32
            written[name] = out.nifti(path, volume_of(name), affine, content, dtype=dtype)
    return written


RUMBA_OUTPUTS = ("fod", "fod_amplitudes", "combined_odf", "fwm", "fiso", "fgm", "fcsf", "snr", "status")


def read_wm_response(value: Any) -> tuple[list[float] | list[list[float]], str]:
    """White-matter response for RUMBA-SD: eigenvalues (3, or 3 per shell) or a response file whose JSON
    sidecar holds ``Eigenvalues`` (as ``dwirecon response ssst`` writes). Returns the values and a description."""
    if value is None:
        from dwiflow.core.rumba import DEFAULT_WM_RESPONSE

        return list(DEFAULT_WM_RESPONSE), "default"
    if isinstance(value, (str, os.PathLike)):
        import json

        p = existing_file(value, "white-matter response")
        side = sidecar_path(p)
        try:
            evals = json.loads(side.read_text())["Eigenvalues"] if side.is_file() else None
        except (ValueError, KeyError):
            evals = None
        if evals is None:
            raise DwiflowInputError(f"white-matter response {p} has no tensor eigenvalues in its sidecar {side.name}; "
                                    "RUMBA-SD needs eigenvalues (e.g. from `dwirecon response ssst`) or three numbers")
        return [float(v) for v in evals], f"eigenvalues from {p.name}"
    return [float(v) for v in np.ravel(value)], "given"


def rumba_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    outputs: dict[str, PathLike],
    *,
    mask: PathLike | None = None,
    wm_response: Any = None,
    gm_response: float | None = 0.8e-3,
    csf_response: float | None = 3.0e-3,
    n_iter: int = 600,
    recon_type: str = "smf",
    n_coils: int | None = None,
    R: int = 1,
    global_fit: bool = False,
    use_tv: bool = False,
    sphere: str = "repulsion724",
    sh_lmax: int = 8,
    precision: str = "float32",
    n_threads: int | None = None,
    progress=None,
) -> dict[str, Path]:
    """RUMBA-SD fit; writes the requested maps (keys of :data:`RUMBA_OUTPUTS` → paths), all or nothing.

    The fODF is written as SH (MRtrix3 basis, world frame, degree ``sh_lmax``) and, if asked, as
    amplitudes on the model sphere; fractions, the SNR estimate and a status map alongside.
    """
    from dwiflow.core.rumba import STATUS_LEVELS, RumbaSDModel

    _check_outputs("RUMBA-SD", outputs, RUMBA_OUTPUTS)
    if global_fit is False and use_tv:
        raise DwiflowInputError("total variation (--tv) needs the global fit (--global)")
    if "fgm" in outputs and gm_response is None:
        raise DwiflowInputError("a grey-matter fraction map was asked for but the GM compartment is switched off")
    if "fcsf" in outputs and csf_response is None:
        raise DwiflowInputError("a CSF fraction map was asked for but the CSF compartment is switched off")
    evals, evals_source = read_wm_response(wm_response)
    run = load_dwi(dwi, bval, bvec)
    n_dw_shells = len([s_ for s_ in run.gtab.shells if not s_.is_b0])
    evals_arr = np.asarray(evals, dtype=float)
    if evals_arr.size == 3 * n_dw_shells and evals_arr.size != 3:
        evals_arr = evals_arr.reshape(n_dw_shells, 3)
    model = RumbaSDModel(run.gtab, wm_response=evals_arr, gm_response=gm_response, csf_response=csf_response,
                         n_iter=n_iter, recon_type=recon_type, n_coils=n_coils, R=R, sphere=sphere,
                         voxelwise=not global_fit, use_tv=use_tv, precision=precision, n_threads=n_threads)
    voxels = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else _voxels_with_signal(run, dwi)
    fit = model.fit(run.data, voxels, progress=progress)
    sh = fit.odf_sh(sh_lmax) if {"fod", "combined_odf"} & set(outputs) else None
    maps = {
        "fod": lambda: fit.volume(np.nan_to_num(sh), fill=0.0),
        "fod_amplitudes": fit.odf,
        "combined_odf": lambda: fit.volume(np.nan_to_num(fit.combined_odf_sh(sh_lmax, sh)), fill=0.0),
        "fwm": lambda: fit.f_wm, "fiso": lambda: fit.f_iso, "fgm": lambda: fit.f_gm, "fcsf": lambda: fit.f_csf,
        "snr": fit.snr, "status": fit.status_volume,
    }
    params = {
        "WhiteMatterResponse": np.asarray(model.wm_response).tolist(), "WhiteMatterResponseSource": evals_source,
        "GreyMatterDiffusivity": gm_response, "CsfDiffusivity": csf_response, "Iterations": model.n_iter,
        "ReconType": recon_type, "NoiseOrder": model.order, "AccelerationFactor": R, "Fit": "global" if global_fit
        else "voxelwise", "TotalVariation": use_tv, "Sphere": sphere if isinstance(sphere, str) else "custom",
        "SphereDirections": int(model.vertices.shape[0]), "Precision": precision,
        "VoxelsFailed": int((fit.status != 0).sum()),
    }
    sources = _provenance(dwi, bval, bvec, mask, wm_response if isinstance(wm_response, (str, os.PathLike)) else None)
    orientation = {"fod": {"SphericalHarmonicDegree": int(sh_lmax)},
                   "combined_odf": {"SphericalHarmonicDegree": int(sh_lmax)},
                   "fod_amplitudes": {"Directions": np.round(model.vertices, 8).tolist()}}
    return _write_model_maps("rumba", outputs, lambda name: maps[name](), run.affine, params, sources, STATUS_LEVELS,
                             orientation)


MAPMRI_INDICES = ("rtop", "rtap", "rtpp", "msd", "qiv", "ng", "ngpar", "ngperp")
MAPMRI_OUTPUTS = MAPMRI_INDICES + ("lapnorm", "lambda", "odf", "signal", "status", "compare")
# the standard MAP-MRI variants (Fick 2016; DIPY's tutorial) a run can compare with its own fit, as option overrides
MAPMRI_VARIANTS: dict[str, dict[str, Any]] = {
    "MAP": {"laplacian_weighting": 0.0, "positivity": "none"},
    "MAPL": {"laplacian_weighting": "gcv", "positivity": "none"},
    "CMAP": {"laplacian_weighting": 0.0, "positivity": "grid"},
    "CMAPL": {"laplacian_weighting": "gcv", "positivity": "grid"},
    "MAP+": {"laplacian_weighting": 0.0, "positivity": "global"},
}


def diffusion_times(dwi: PathLike, big_delta: float | None, small_delta: float | None) -> tuple[float | None, float | None, str]:
    """Δ and δ (s): the options if given, else ``LargeDelta``/``SmallDelta`` of the DWI's JSON sidecar."""
    if big_delta is not None or small_delta is not None:
        if big_delta is None or small_delta is None:
            raise DwiflowInputError("give both --big-delta and --small-delta (seconds), or neither")
        return float(big_delta), float(small_delta), "options"
    meta = read_sidecar(dwi)
    if meta is not None and "LargeDelta" in meta and "SmallDelta" in meta:
        return float(meta["LargeDelta"]), float(meta["SmallDelta"]), sidecar_path(dwi).name
    return None, None, "none"


def mapmri_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    outputs: dict[str, PathLike],
    *,
    mask: PathLike | None = None,
    radial_order: int = 6,
    anisotropic: bool = True,
    laplacian_weighting: float | str = 0.2,
    positivity: str = "none",
    pos_grid: int = 15,
    pos_radius: float | str = "adaptive",
    solver: str = "CLARABEL",
    big_delta: float | None = None,
    small_delta: float | None = None,
    bval_threshold: float | None = None,
    odf_moment: int = 2,
    compare: list[str] | None = None,
    progress=None,
) -> dict[str, Path]:
    """MAP-MRI fit; writes the requested maps (keys of :data:`MAPMRI_OUTPUTS` → paths), all or nothing.

    Δ/δ come from the options or the DWI's sidecar (``LargeDelta``/``SmallDelta``, seconds); the
    q-space indices need them. Non-Gaussianities exist for the anisotropic basis only.
    ``compare``: names of :data:`MAPMRI_VARIANTS` fitted as well (same basis and grid); the
    ``compare`` output holds the indices of this fit and of each variant, one volume per (fit, index).
    """
    from dwiflow.core.mapmri import STATUS_LEVELS, MapmriModel

    _check_outputs("MAP-MRI", outputs, MAPMRI_OUTPUTS)
    if not anisotropic and {"ng", "ngpar", "ngperp"} & set(outputs):
        raise DwiflowInputError("non-Gaussianity maps need the anisotropic basis (drop --isotropic)")
    big, small, times_source = diffusion_times(dwi, big_delta, small_delta)
    wants_indices = set(MAPMRI_INDICES) & set(outputs)
    if wants_indices and big is None:
        raise DwiflowInputError(f"q-space indices ({', '.join(sorted(wants_indices))}) need the diffusion times: no "
                                f"LargeDelta/SmallDelta in the sidecar of {Path(dwi).name}; give --big-delta and --small-delta")
    if isinstance(laplacian_weighting, str) and laplacian_weighting.lower() != "gcv":
        try:
            laplacian_weighting = float(laplacian_weighting)
        except ValueError:
            raise DwiflowInputError(f"laplacian weight must be a number or 'gcv', got {laplacian_weighting!r}") from None
    run = load_dwi(dwi, bval, bvec)
    model = MapmriModel(run.gtab, radial_order=radial_order, anisotropic_scaling=anisotropic,
                        laplacian_weighting=laplacian_weighting, big_delta=big, small_delta=small,
                        bval_threshold=np.inf if bval_threshold is None else bval_threshold, positivity=positivity,
                        pos_grid=pos_grid, pos_radius=pos_radius, solver=solver)
    compare = list(compare or [])
    unknown = [name for name in compare if name not in MAPMRI_VARIANTS]
    if unknown:
        raise DwiflowInputError(f"compare: unknown MAP-MRI variant(s) {unknown}; known: {list(MAPMRI_VARIANTS)}")
    if not anisotropic and "MAP+" in compare:
        raise DwiflowInputError("compare: MAP+ (global positivity) needs the anisotropic basis")
    if ("compare" in outputs) != bool(compare):
        raise DwiflowInputError("the compare map needs compare=[variant, ...] and compare needs the compare map")
    if compare and big is None:
        raise DwiflowInputError("comparing MAP-MRI variants needs the diffusion times (LargeDelta/SmallDelta)")
    voxels = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else _voxels_with_signal(run, dwi)
    fit = model.fit(run.data, voxels, progress=progress)
    compared = []
    for name in compare:  # the same model with the variant's regularisation and positivity
        variant = MapmriModel(run.gtab, radial_order=radial_order, anisotropic_scaling=anisotropic, big_delta=big,
                              small_delta=small, bval_threshold=np.inf if bval_threshold is None else bval_threshold,
                              pos_grid=pos_grid, pos_radius=pos_radius, solver=solver, **MAPMRI_VARIANTS[name])
        compared.append((name, variant.fit(run.data, voxels, progress=progress)))
    compare_indices = [i for i in MAPMRI_INDICES if anisotropic or i not in ("ng", "ngpar", "ngperp")] + ["lapnorm"]

    def comparison() -> np.ndarray:
        columns = []
        for this in [fit] + [f for _, f in compared]:
            for index in compare_indices:
                values = np.asarray(_mapmri_index(this, index)())
                columns.append(np.where(this.status == 0, values, np.nan))
        return np.stack(columns, axis=-1)

    getters = {**{index: _mapmri_index(fit, index) for index in MAPMRI_INDICES + ("lapnorm",)},
               "lambda": lambda: fit.lambdas, "odf": lambda: fit.odf_sh(odf_moment), "signal": fit.fitted_signal,
               "status": lambda: fit.status, "compare": comparison}
    params = {"RadialOrder": model.radial_order, "Basis": "anisotropic" if anisotropic else "isotropic",
              "LaplacianWeighting": laplacian_weighting if isinstance(laplacian_weighting, str) else float(laplacian_weighting),
              "Positivity": positivity, "PositivityGrid": pos_grid if positivity == "grid" else None,
              "PositivityRadius": pos_radius if positivity == "grid" else None,
              "Solver": solver if positivity != "none" else None, "BigDelta": big, "SmallDelta": small,
              "DiffusionTimesFrom": times_source, "Tau": model.tau, "BvalThreshold": bval_threshold,
              "OdfRadialMoment": odf_moment, "VoxelsFailed": int((fit.status != 0).sum())}
    if compare:
        label = f"this run ({'MAPL' if laplacian_weighting != 0 else 'MAP'}{', ' + positivity if positivity != 'none' else ''})"
        params["Compare"] = {"Fits": [label] + compare, "Indices": compare_indices,
                             "Volumes": "fit-major: volume = fit * n_indices + index",
                             "VoxelsFailed": {name: int((f.status != 0).sum()) for name, f in compared}}

    def volume_of(name: str) -> np.ndarray:
        values = np.asarray(getters[name]())
        fill = 0 if name in ("odf", "status") else np.nan
        if name not in ("status", "compare"):  # failed voxels get the fill value (compare: per fit, above)
            values = np.where(fit.status.reshape((-1,) + (1,) * (values.ndim - 1)) == 0, values, fill)
        return fit.volume(values, fill=fill)

    return _write_model_maps("mapmri", outputs, volume_of, run.affine, params, _provenance(dwi, bval, bvec, mask),
                             STATUS_LEVELS, {"odf": {"SphericalHarmonicDegree": int(model.radial_order)}})


def _mapmri_index(fit, name: str):
    """The method of a MAP-MRI fit computing index ``name`` (stage output names)."""
    return {"rtop": fit.rtop, "rtap": fit.rtap, "rtpp": fit.rtpp, "msd": fit.msd, "qiv": fit.qiv, "ng": fit.ng,
            "ngpar": fit.ng_parallel, "ngperp": fit.ng_perpendicular, "lapnorm": fit.laplacian_norm}[name]


SMT_OUTPUTS = ("lpar", "lperp", "f", "fw", "mse", "r2", "status", "odi", "kappa", "mu", "fod", "fodmse", "beta", "nu",
               "fodfrac")
SMT_FOD_OUTPUTS = ("odi", "kappa", "mu", "fod", "fodmse")  # Watson and Bingham
SMT_BINGHAM_OUTPUTS = ("beta", "nu")
SMT_MULTI_OUTPUTS = ("fodfrac",)  # with n_fod > 1


def smt_stage(
    dwi: PathLike,
    bval: PathLike,
    bvec: PathLike,
    outputs: dict[str, PathLike],
    *,
    mask: PathLike | None = None,
    fod: str = "watson",
    n_fod: int = 1,
    free_water: bool = False,
    lambda_par_bounds: tuple[float, float] = (0.1e-3, 3.0e-3),
    sh_lmax: int = 8,
    progress=None,
) -> dict[str, Path]:
    """SMT kernel (and optionally a Watson or Bingham FOD on it); writes the requested maps, all or nothing."""
    from dwiflow.core.smt import STATUS_LEVELS, SmtModel, fit_bingham, fit_multi_watson, fit_watson

    _check_outputs("SMT", outputs, SMT_OUTPUTS)
    if fod not in ("none", "watson", "bingham"):
        raise DwiflowInputError(f"fod must be 'none', 'watson' or 'bingham', got {fod!r}")
    fod_outputs = set(SMT_FOD_OUTPUTS + SMT_BINGHAM_OUTPUTS) & set(outputs)
    if fod == "none" and fod_outputs:
        raise DwiflowInputError(f"FOD maps {sorted(fod_outputs)} need --fod watson or bingham")
    if fod == "watson" and set(SMT_BINGHAM_OUTPUTS) & set(outputs):
        raise DwiflowInputError(f"maps {sorted(set(SMT_BINGHAM_OUTPUTS) & set(outputs))} need --fod bingham")
    if isinstance(n_fod, bool) or not isinstance(n_fod, int) or not 1 <= n_fod <= 3:
        raise DwiflowInputError(f"n_fod must be 1, 2 or 3, got {n_fod!r}")
    if n_fod > 1 and fod != "watson":
        raise DwiflowInputError("several FOD compartments (n_fod > 1) are fitted as Watsons: use --fod watson")
    if ("fodfrac" in outputs) != (n_fod > 1):
        raise DwiflowInputError("the FOD fraction map (fodfrac) goes with n_fod > 1, and n_fod > 1 with it")
    if "fw" in outputs and not free_water:
        raise DwiflowInputError("a free-water map needs the isotropic compartment (--isotropic-compartment)")
    run = load_dwi(dwi, bval, bvec)
    model = SmtModel(run.gtab, lambda_par_bounds=lambda_par_bounds, free_water=free_water)
    voxels = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else _voxels_with_signal(run, dwi)
    fit = model.fit(run.data, voxels, progress=progress)
    maps = {"lpar": fit.lambda_par, "lperp": fit.lambda_perp, "f": fit.fraction, "fw": fit.free_water,
            "mse": fit.mse, "r2": fit.r2, "status": fit.status}
    if fod != "none" and fod_outputs:
        ok = np.flatnonzero(fit.status == 0)
        args = (fit.batch.signal()[ok], run.gtab, fit.lambda_par[ok], fit.lambda_perp[ok])
        water = None if fit.free_water is None else fit.free_water[ok]
        extra: tuple = ()
        if n_fod > 1:
            orientation = fit_multi_watson(*args, n_fod, free_water=water)
            extra = (("fodfrac", orientation.fractions),)
        else:
            orientation = fit_watson(*args, free_water=water)
        if fod == "bingham":
            orientation = fit_bingham(*args, initial=orientation, free_water=water)
            extra = (("beta", orientation.beta_fraction), ("nu", orientation.nu))
        n = fit.status.size
        mu = orientation.mu.reshape(len(ok), -1)  # (n, 3·n_fod): one unit vector per compartment
        for name, values in (("odi", orientation.odi), ("kappa", orientation.kappa), ("fodmse", orientation.mse),
                             ("mu", mu), ("fod", orientation.sh(sh_lmax))) + extra:
            full = np.full((n,) + values.shape[1:], 0.0 if name == "fod" else np.nan)
            full[ok] = values
            maps[name] = full
    params = {"Kernel": "zeppelin, lambda_perp = f * lambda_par", "LambdaParBounds": list(lambda_par_bounds),
              "FreeWater": free_water, "Fod": fod, "FodCompartments": n_fod if fod != "none" else 0,
              "ShellBvalues": [float(b) for b in model.bvalues],
              "VoxelsFailed": int((fit.status != 0).sum())}
    return _write_model_maps(
        "smt", outputs, lambda name: fit.volume(np.asarray(maps[name]), fill=0 if name in ("fod", "status") else np.nan),
        run.affine, params, _provenance(dwi, bval, bvec, mask), STATUS_LEVELS,
        {"fod": {"SphericalHarmonicDegree": int(sh_lmax)}})


def fod_point_spread_function(fod: PathLike, lmax: int) -> np.ndarray:
    """The point-spread function (zonal coefficients) that CSD wrote into an FOD's sidecar."""
    side = sidecar_path(fod)
    entry = (read_sidecar(fod) or {}).get("PointSpreadFunction")
    if entry is None:
        raise DwiflowInputError(f"--subtract-psf needs the FOD's point-spread function in its sidecar "
                                f"{side.name} (dwirecon csd writes it); {fod} has none")
    coefficients = np.asarray(entry.get("Coefficients", []) if isinstance(entry, dict) else [], dtype=float)
    if coefficients.shape != (lmax // 2 + 1,) or not np.all(np.isfinite(coefficients)):
        raise DwiflowInputError(f"the FOD's sidecar {side} has a PointSpreadFunction that is not {lmax // 2 + 1} "
                                f"finite zonal coefficients (the FOD's degree is {lmax})")
    return coefficients


def peaks_stage(
    fod: PathLike,
    out_peaks: PathLike,
    *,
    mask: PathLike | None = None,
    npeaks: int = 3,
    rel_threshold: float = 0.2,
    threshold: float = 0.0,
    min_separation: float = 25.0,
    subtract_psf: bool = False,
) -> Path:
    """FOD peaks: 4D NIfTI of 3×npeaks volumes, amplitude-scaled vectors, NaN where absent.

    Local maxima, as MRtrix3's ``sh2peaks``; with ``subtract_psf``, peaks after the first are found
    by subtracting the FOD's point-spread function from its sidecar (CSD writes it; see
    :func:`dwiflow.core.peaks.find_peaks`), which must then be there.
    """
    from dwiflow.core.peaks import find_peaks

    sh, affine, lmax = load_sh_image(fod)
    psf = fod_point_spread_function(fod, lmax) if subtract_psf else None
    voxels = load_mask(mask, sh.shape[:3], affine) if mask is not None else None
    peaks = find_peaks(sh, voxels, npeaks=npeaks, rel_threshold=rel_threshold, abs_threshold=threshold,
                       min_separation_deg=min_separation, psf=psf)
    params = {"NumberOfPeaks": npeaks, "RelativeThreshold": rel_threshold, "AbsoluteThreshold": threshold,
              "MinSeparationDegrees": min_separation,
              "Method": "point-spread-function subtraction" if psf is not None else "local maxima"}
    with atomic_outputs() as out:
        out.nifti(out_peaks, peaks.vectors.reshape(sh.shape[:3] + (3 * npeaks,)), affine,
                  sidecar("peaks", params, **_provenance(fod, mask)))
    return Path(out_peaks)


FOD_METRIC_OUTPUTS = ("afd_total", "peak_amplitude", "nufo", "gfa")


def fod_metrics_stage(
    fod: PathLike, peaks: PathLike, out_dir: PathLike, *, source_entities: dict[str, str] | None = None
) -> dict[str, Path]:
    """Total AFD, per-peak amplitude, NuFO and GFA, one NIfTI + sidecar each in ``out_dir``."""
    from dwiflow.bids_specs.outputs import output_filename
    from dwiflow.core.peaks import fod_metrics

    sh, affine, _ = load_sh_image(fod)
    pk = load_image(peaks, "peaks")
    if len(pk.shape) != 4 or pk.shape[3] % 3:
        raise DwiflowInputError(f"peaks {peaks} must be 4D with 3 volumes per peak, got shape {pk.shape}")
    if tuple(pk.shape[:3]) != sh.shape[:3]:
        raise DwiflowInputError(f"peaks {peaks} has spatial shape {pk.shape[:3]} but the FOD has {sh.shape[:3]}")
    maps = fod_metrics(sh, np.asarray(pk.dataobj, dtype=float))
    written: dict[str, Path] = {}
    with atomic_outputs() as out:
        for key in FOD_METRIC_OUTPUTS:
            name = output_filename(key, source_entities or {})
            dtype = np.uint8 if key == "nufo" else np.float32
            written[key] = out.nifti(Path(out_dir) / name, maps[key], affine,
                                     sidecar(key, **_provenance(fod, peaks)), dtype=dtype)
    return written


def phantom_stage(
    out_dir: PathLike,
    scheme: str = "single",
    shape: tuple[int, int, int] = (10, 10, 10),
    snr: float | None = 30.0,
    seed: int = 0,
    voxel_size: float = 2.0,
    background: tuple[int, int, int] = (3, 3, 2),
) -> dict[str, Path]:
    """Write a small BIDS dataset of a multi-fibre phantom plus its ground truth.

    Layout: ``OUT/sub-phantom/dwi/sub-phantom_dwi.{nii.gz,bval,bvec,json}``, the tissue block as a
    brain-mask derivative in ``OUT/derivatives/masks`` (as ../shared/data/bids_real ships), and
    ``OUT/derivatives/truth/sub-phantom/dwi/`` with the number of fibres, fractions,
    fibre directions (world frame) and the CSF fraction. The tissue block of ``shape`` sits in a
    field of view padded by ``background`` voxels per side that hold only noise (as outside a
    head), so that masking behaves as on real data; truth maps are 0 there.
    """
    gtab = acquisition_scheme(scheme)
    tissue = make_phantom(gtab, shape, snr=snr, seed=seed, csf_fraction=(0.0, 0.2))
    pad = [(b, b) for b in background]
    rng = np.random.default_rng(seed + 1)
    sigma = 0.0 if snr is None else tissue.s0 / snr
    data = np.pad(tissue.data, pad + [(0, 0)])
    outside = np.pad(np.zeros(shape, bool), pad, constant_values=True)
    if sigma:
        noise = rng.standard_normal((int(outside.sum()), gtab.n_volumes, 2)) * sigma
        data[outside] = np.hypot(noise[..., 0], noise[..., 1])
    phantom = tissue
    shape = data.shape[:3]
    # LAS storage (negative determinant), as most scanners' NIfTI conversions
    affine = np.diag([-voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = [voxel_size * shape[0] / 2, -voxel_size * shape[1] / 2, -voxel_size * shape[2] / 2]
    root = Path(out_dir)
    dwi_dir = root / "sub-phantom" / "dwi"
    truth_dir = root / "derivatives" / "truth" / "sub-phantom" / "dwi"
    mask_dir = root / "derivatives" / "masks" / "sub-phantom" / "dwi"
    base = dwi_dir / "sub-phantom_dwi"
    fsl_bvecs = world_to_fsl_bvecs(gtab.bvecs, affine)
    truth_common = {"FibreEigenvalues": list(phantom.evals), "S0": phantom.s0, "SNR": snr, "Seed": seed,
                    "Scheme": scheme}
    files: dict[str, Path] = {}
    with atomic_outputs() as out:
        out.json(root / "dataset_description.json", {
            "Name": f"dwiflow phantom ({scheme}-shell, {shape[0]}x{shape[1]}x{shape[2]})",
            "BIDSVersion": "1.9.0", "DatasetType": "raw",
            "GeneratedBy": [{"Name": "dwiflow", "Version": __version__, "Description": "dwirecon phantom"}],
        })
        out.json(root / "derivatives" / "truth" / "dataset_description.json", {
            "Name": "dwiflow phantom ground truth", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "dwiflow", "Version": __version__}],
        })
        files["dwi"] = out.nifti(base.with_name(base.name + ".nii.gz"), data, affine,
                                 {"Description": "Simulated multi-tensor DWI with Rician noise", **truth_common})
        files["bval"] = out.text(base.with_name(base.name + ".bval"), " ".join(f"{b:g}" for b in gtab.bvals) + "\n")
        files["bvec"] = out.text(base.with_name(base.name + ".bvec"),
                                 "\n".join(" ".join(f"{v:.8f}" for v in row) for row in fsl_bvecs.T) + "\n")
        truth = {
            "nfibres": (np.pad(phantom.n_fibres, pad), np.uint8, "Number of fibres (0 outside the tissue)"),
            "fractions": (np.pad(phantom.fractions, pad + [(0, 0)]), np.float32, "Fibre volume fractions of the tissue"),
            "directions": (np.pad(np.nan_to_num(phantom.directions.reshape(phantom.n_fibres.shape + (-1,))), pad + [(0, 0)]),
                           np.float32, "Fibre directions in world coordinates, 3 volumes per fibre (0 where absent)"),
            "csf": (np.pad(phantom.csf_fraction, pad), np.float32, "Free-water (CSF) volume fraction"),
        }
        out.json(root / "derivatives" / "masks" / "dataset_description.json", {
            "Name": "dwiflow phantom brain mask (the tissue block)", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "dwiflow", "Version": __version__}],
        })
        files["mask"] = out.nifti(mask_dir / output_filename("brain_mask", {"sub": "phantom"}), (~outside).astype(np.uint8),
                                  affine, {"Description": "The phantom's tissue block", "Type": "Brain"}, dtype=np.uint8)
        for name, (array, dtype, desc) in truth.items():
            path = truth_dir / output_filename("truth", {"sub": "phantom", "desc": name})
            files[name] = out.nifti(path, array, affine, {"Description": desc, **truth_common}, dtype=dtype)
    return files


def describe_outputs(paths: dict[str, Path]) -> str:
    """One line per written file (for command-line reports)."""
    return "\n".join(f"  {k:10s} {v}" for k, v in paths.items())

