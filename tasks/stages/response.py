"""Stage ``response``: response-function estimation, one method per algorithm.

Every method writes MRtrix3's text format (zonal SH per shell) plus a JSON sidecar, and the voxels
it selected. ``amp2response`` needs a single-fibre mask and a fibre-direction image, which only a
user can give: it is a ``dwirecon`` command, not a recon-spec method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import atomic_outputs, existing_file, load_dwi, load_image, load_mask, read_numbers, sidecar_path
from dwiflow.tasks.options import Alias, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage, StageGroup
from dwiflow.tasks.stagelib import DWI_INPUTS, brain_mask, on_shells, provenance, thread_count

_MASK = Input("mask", "MASK", "brain mask (default: median-Otsu on the b=0 volumes)", required=False, flag=True)
_OUTPUTS = (Output("response", "the response function (MRtrix3 text format)", cli="positional", metavar="OUT_TXT"),
            Output("voxels", "the voxels selected for the response", cli="flag", metavar="OUT_MASK"))


def _sidecar(response, method: str, parameters: dict[str, Any], *sources) -> dict[str, Any]:
    return {
        "Description": f"Response function (zonal SH per shell, MRtrix3 convention) estimated by {method}",
        "Method": method,
        "Parameters": parameters,
        "Shells": [float(b) for b in response.bvalues],
        "Lmax": [int(l) for l in response.lmax],
        "ResponseFunction": {"Coefficients": response.coefficients.tolist(), "Type": "zsh"},
        **provenance(*sources),
    }


def _write(outputs, response, content, affine, voxels=None, method: str = ""):
    """Response text + sidecar, and optionally the selected-voxel mask, all or nothing."""
    written = {}
    with atomic_outputs() as out:
        written["response"] = out.text(outputs["response"], response.to_text())
        out.json(sidecar_path(outputs["response"]), content)
        if "voxels" in outputs and voxels is not None:
            written["voxels"] = out.nifti(
                outputs["voxels"], voxels.astype(np.uint8), affine,
                {"Description": f"Voxels selected for the {method} response", "VoxelCount": int(voxels.sum()),
                 "Sources": content["Sources"]}, dtype=np.uint8)
    return written


# ------------------------------------------------------------------------------------------------ fa
@dataclass(frozen=True)
class FaOptions(StageOptions):
    """MRtrix3 ``dwi2response fa`` parameters."""

    number: int = option(300, help="voxels to select", minimum=1)
    erode: int = option(3, help="erosions of the brain mask", minimum=0, maximum=50)
    shells: list[float] | None = option(None, help="b-values of the shells to estimate (default: the largest)",
                                        minimum=0)
    lmax: list[int] | None = option(None, help="lmax per shell", minimum=0, even=True)


def run_fa(files, outputs, options: FaOptions, context):
    """MRtrix3 ``dwi2response fa``: top-FA voxels of the eroded mask, then amp2response (largest shell)."""
    from dwiflow.core.response import amp2response, fa_response_voxels

    dwi = files["dwi"]
    run = load_dwi(dwi, files["bval"], files["bvec"])
    brain = brain_mask(run, files.get("mask"))
    voxels, v1, _ = fa_response_voxels(run.data, run.gtab, brain, erode=options.erode, number=options.number)
    shells = options.shells
    if shells is None:
        if not run.gtab.dw_shells:
            raise DwiflowInputError(f"{files['bval']} has no diffusion-weighted shell")
        shells = [run.gtab.dw_shells[-1].bvalue]
    response = amp2response(np.asarray(run.data[voxels], dtype=float), v1[voxels], run.gtab, shells=shells,
                            lmax=options.lmax)
    params = {"Number": options.number, "Erode": options.erode, "Shells": shells, "Lmax": options.lmax,
              "Voxels": int(voxels.sum())}
    content = _sidecar(response, "fa (MRtrix3 dwi2response fa)", params, dwi, files.get("mask"))
    return _write(outputs, response, content, run.affine, voxels, "fa")


# ------------------------------------------------------------------------------------------------ ssst
@dataclass(frozen=True)
class SsstOptions(StageOptions):
    """DIPY ``auto_response_ssst`` parameters."""

    roi_radii: list[int] = option([10], help="half-sizes of the central box in voxels (one, or one per axis)",
                                  minimum=1, length=(1, 3), metavar="R[,R,R]")
    roi_center: list[int] | None = option(None, help="centre of the box (default: the volume's centre)", minimum=0,
                                          length=3, metavar="X,Y,Z")
    fa_threshold: float = option(0.7, help="FA threshold", minimum=0, maximum=1, aliases=(Alias("fa_thr"),))


def run_ssst(files, outputs, options: SsstOptions, context):
    """DIPY ``auto_response_ssst``: FA-thresholded central ROI, mean eigenvalues and S0, also written as zonal SH
    for every shell (lmax 10, 0 at b=0)."""
    from dwiflow.core.response import mask_for_response_ssst, response_from_mask_ssst, tensor_response_zonal

    dwi = files["dwi"]
    run = load_dwi(dwi, files["bval"], files["bvec"])
    mask = files.get("mask")
    brain = load_mask(mask, run.data.shape[:3], run.affine) if mask is not None else None
    radii = options.roi_radii[0] if len(options.roi_radii) == 1 else tuple(options.roi_radii)
    center = tuple(options.roi_center) if options.roi_center else None
    voxels = mask_for_response_ssst(run.data, run.gtab, center, radii, options.fa_threshold, brain)
    ssst = response_from_mask_ssst(run.data, run.gtab, voxels)
    lmaxes = [0 if s.is_b0 else 10 for s in run.gtab.shells]
    response = tensor_response_zonal(ssst.evals, ssst.s0, np.array([s.bvalue for s in run.gtab.shells]), lmaxes)
    params = {"RoiRadii": radii, "RoiCenter": center, "FaThreshold": options.fa_threshold}
    content = _sidecar(response, "ssst (DIPY auto_response_ssst)", params, dwi, mask)
    content.update({"Eigenvalues": ssst.evals.tolist(), "S0": ssst.s0, "VoxelCount": ssst.n_voxels,
                    "EigenvalueRatio": ssst.ratio})
    return _write(outputs, response, content, run.affine, voxels, "SSST")


# ------------------------------------------------------------------------------------------------ tournier, tax
@dataclass(frozen=True)
class TournierOptions(StageOptions):
    """MRtrix3 ``dwi2response tournier`` parameters."""

    sf_voxels: int = option(300, help="single-fibre voxels in the final selection", minimum=1)
    iter_voxels: int = option(3000, help="voxels re-examined each iteration", minimum=1)
    dilate: int = option(1, help="dilations of the selection that give the voxels re-examined", minimum=0)
    max_iters: int = option(10, help="iteration limit", minimum=2)
    lmax: int | None = option(None, help="lmax of the response (default: 8, or what the directions support)",
                              minimum=2, even=True)
    shell: float | None = option(None, help="b-value of the shell to use (default: the largest)", minimum=0)


@dataclass(frozen=True)
class TaxOptions(StageOptions):
    """Recursive calibration parameters (DIPY ``recursive_response`` names and defaults)."""

    lmax: int = option(8, help="lmax of the CSD fits and the response", minimum=2, even=True)
    peak_thr: float = option(0.01, help="largest second-to-first peak ratio of a single-fibre voxel", minimum=0)
    init_fa: float = option(0.08, help="FA of the initial (fat) tensor response", exclusive_minimum=True, minimum=0,
                            maximum=1)
    init_trace: float = option(0.0021, help="trace of the initial tensor response", exclusive_minimum=True,
                               minimum=0, units="mm²/s")
    max_iters: int = option(8, help="iteration limit", minimum=1)
    convergence: float = option(0.001, help="stop when the response changes less than this (relative)",
                                exclusive_minimum=True, minimum=0)


def _run_iterative(method: str):
    def run(files, outputs, options, context):
        """Tournier (MRtrix3 ``dwi2response tournier``) or Tax (DIPY ``recursive_response``) response."""
        from dwiflow.core.response_iterative import tax_response, tournier_response

        dwi, mask = files["dwi"], files.get("mask")
        run_ = load_dwi(dwi, files["bval"], files["bvec"])
        values = options.to_dict()
        if method == "tournier":
            result = tournier_response(run_.data, run_.gtab, brain_mask(run_, mask), **values)
            label = "tournier (MRtrix3 dwi2response tournier)"
        else:
            wm = load_mask(mask, run_.data.shape[:3], run_.affine) if mask is not None else None
            result = tax_response(run_.data, run_.gtab, wm, **values)
            label = "tax (recursive calibration, DIPY recursive_response)"
        params = {**values, "Iterations": result.iterations, "Converged": result.converged,
                  "Voxels": int(result.voxels.sum())}
        content = _sidecar(result.response, label, params, dwi, mask)
        return _write(outputs, result.response, content, run_.affine, result.voxels, method)

    return run


# ------------------------------------------------------------------------------------------------ amp2response
@dataclass(frozen=True)
class Amp2responseOptions(StageOptions):
    """MRtrix3 ``amp2response`` parameters."""

    shells: list[float] | None = option(None, help="b-values of the shells to use, e.g. 0,1000 (default: all)",
                                        minimum=0)
    lmax: list[int] | None = option(None, help="lmax per shell, e.g. 0,8,8 (default 10, 0 for b=0)", minimum=0,
                                    even=True)
    isotropic: bool = option(False, help="lmax 0 for every shell")
    noconstraint: bool = option(False, help="no non-negativity/monotonicity constraints")


def load_fibre_directions(path, spatial_shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A 4D image whose first three volumes are per-voxel fibre directions (world frame)."""
    img = load_image(path, "directions image")
    if len(img.shape) != 4 or img.shape[3] < 3:
        raise DwiflowInputError(f"directions image {path} must be 4D with at least 3 volumes, got shape {img.shape}")
    if tuple(img.shape[:3]) != tuple(spatial_shape):
        raise DwiflowInputError(f"directions image {path} has spatial shape {img.shape[:3]} but the DWI has "
                                f"{tuple(spatial_shape)}")
    if not np.allclose(img.affine, affine, atol=1e-3):
        raise DwiflowInputError(f"directions image {path} is not on the DWI's voxel grid (affines differ)")
    return np.asarray(img.dataobj[..., :3], dtype=float)


def read_direction_file(path, n_volumes: int) -> np.ndarray:
    """External directions: N×3 unit vectors, or N×2 [azimuth, elevation] in radians (MRtrix3)."""
    from dwiflow.core.sh import sphere_to_cart

    p = existing_file(path, "directions")
    values = read_numbers(p, "directions")
    if values.shape[1] == 2:
        values = sphere_to_cart(values[:, 1], values[:, 0])
    if values.shape != (n_volumes, 3):
        raise DwiflowInputError(f"directions file {p} has {values.shape[0]} rows of {values.shape[1]} values; "
                                f"expected {n_volumes} rows (one per volume) of 3 (x y z) or 2 (azimuth elevation)")
    return values


def run_amp2response(files, outputs, options: Amp2responseOptions, context):
    """MRtrix3-style amp2response from a single-fibre mask and a fibre-direction image."""
    from dwiflow.core.response import amp2response

    dwi, mask, directions_image = files["dwi"], files["mask"], files["directions_image"]
    if files.get("directions") is not None:
        img = load_image(dwi, "amplitude image")
        if len(img.shape) != 4:
            raise DwiflowInputError(f"amplitude image {dwi} must be 4D, got shape {img.shape}")
        data, affine = np.asarray(img.dataobj, dtype=float), img.affine
        ext_dirs, gtab = read_direction_file(files["directions"], img.shape[3]), None
    else:
        run = load_dwi(dwi, files["bval"], files["bvec"])
        data, affine, gtab, ext_dirs = run.data, run.affine, run.gtab, None
    voxels = load_mask(mask, data.shape[:3], affine)
    fibres = load_fibre_directions(directions_image, data.shape[:3], affine)
    response = amp2response(
        np.asarray(data[voxels], dtype=float), fibres[voxels], gtab, directions=ext_dirs, shells=options.shells,
        lmax=options.lmax, isotropic=options.isotropic, constrained=not options.noconstraint,
    )
    params = {"Shells": options.shells, "Lmax": options.lmax, "Isotropic": options.isotropic,
              "Constrained": not options.noconstraint, "Voxels": int(voxels.sum())}
    return _write(outputs, response, _sidecar(response, "amp2response", params, dwi, mask, directions_image), affine)


# ------------------------------------------------------------------------------------------------ dhollander
@dataclass(frozen=True)
class DhollanderOptions(StageOptions):
    """MRtrix3 ``dwi2response dhollander`` parameters (same names and defaults)."""

    erode: int = option(3, help="erosion passes of the brain mask (use 0 for data of a few slices)", minimum=0,
                        maximum=50)
    fa: float = option(0.2, help="FA threshold of the crude white-matter segmentation", minimum=0, maximum=1)
    sfwm: float = option(0.5, help="percentage of the refined WM kept as single-fibre WM voxels",
                         exclusive_minimum=True, minimum=0, maximum=100)
    gm: float = option(2.0, help="percentage of the refined GM kept as GM voxels", exclusive_minimum=True, minimum=0,
                       maximum=100)
    csf: float = option(10.0, help="percentage of the refined CSF kept as CSF voxels", exclusive_minimum=True,
                        minimum=0, maximum=100)
    lmax: list[int] | None = option(None, help="the WM response's lmax per b-value, b=0 included (default 10, "
                                               "0 at b=0)", minimum=0, even=True)
    # command line only: in a recon spec the responses feed a deconvolution of every shell
    shells: list[float] | None = option(None, help="the b-values to use, b=0 included explicitly, e.g. 0,1000,3000 "
                                                   "(default: all; MRtrix3's -shells)", minimum=0, spec=False)
    wm_algo: str | None = option(None, choices=("fa", "tournier", "tax"),
                                 help="select the single-fibre WM voxels inside the refined WM with this "
                                      "dwi2response algorithm instead of the built-in one (Dhollander 2019), as "
                                      "MRtrix3's -wm_algo")


def run_dhollander(files, outputs, options: DhollanderOptions, context):
    """Dhollander et al. 2016/2019 WM, GM and CSF responses and the voxels selected for each."""
    from dwiflow.core.response_dhollander import dhollander

    dwi, mask = files["dwi"], files.get("mask")
    run = load_dwi(dwi, files["bval"], files["bvec"])
    data, gtab, shells = on_shells(run, options.shells)
    if options.lmax is not None and len(options.lmax) != len(shells):
        from dwiflow.tasks.options import OptionError

        raise OptionError(f"{{lmax}}: {len(options.lmax)} values but {len(shells)} b-values are used "
                          f"({', '.join(f'{s.bvalue:.0f}' for s in shells)})", "lmax")
    result = dhollander(data, gtab, brain_mask(run, mask), erode=options.erode, fa=options.fa,
                        sfwm=options.sfwm, gm=options.gm, csf=options.csf, lmax=options.lmax,
                        wm_algo=options.wm_algo, n_threads=thread_count(context))
    params = {"Erode": options.erode, "FA": options.fa, "SFWM": options.sfwm, "GM": options.gm, "CSF": options.csf,
              "Lmax": options.lmax, "Shells": options.shells, "WmAlgo": options.wm_algo,
              "VoxelCounts": result.counts}
    written = {}
    with atomic_outputs() as out:
        for tissue in ("wm", "gm", "csf"):
            response = getattr(result, tissue)
            label = {"wm": "single-fibre white matter", "gm": "grey matter", "csf": "CSF"}[tissue]
            content = _sidecar(response, f"dhollander ({label})", params, dwi, mask)
            written[tissue] = out.text(outputs[tissue], response.to_text())
            out.json(sidecar_path(outputs[tissue]), content)
        if "voxels" in outputs:
            written["voxels"] = out.nifti(
                outputs["voxels"], result.voxels.astype(np.uint8), run.affine,
                {"Description": "Voxels selected for the dhollander responses: volumes CSF, GM, WM (MRtrix3's "
                                "-voxels: red, green, blue)", "VoxelCount": {t.upper(): result.counts[f"voxels_{t}"]
                                                                             for t in ("csf", "gm", "wm")},
                 "Sources": provenance(dwi, files["bval"], files["bvec"], mask)["Sources"]},
                dtype=np.uint8)
    return written


def check_dhollander_data(data, options) -> None:
    from dwiflow.tasks.options import OptionError

    if not data.shells:
        raise DwiflowInputError("dhollander needs b=0 and at least one diffusion-weighted shell; this run has only "
                                "b=0 volumes")
    from dwiflow.core.gradients import DEFAULT_SHELL_TOLERANCE

    available = data.bvalues
    if options.shells is not None:
        missing = [b for b in options.shells if not any(abs(b - a) <= DEFAULT_SHELL_TOLERANCE for a in available)]
        if missing:
            raise OptionError(f"{{shells}}: b={', '.join(f'{b:g}' for b in missing)} not in this run (its b-values: "
                              f"{', '.join(f'{b:.0f}' for b in available)})", "shells")
    used = len(options.shells) if options.shells is not None else len(available)
    if options.lmax is not None and len(options.lmax) != used:
        raise OptionError(f"{{lmax}}: {len(options.lmax)} values but {used} b-values are used (b=0 included)", "lmax")
    if data.shape and options.erode > 0 and min(data.shape) < 2 * options.erode + 1:
        # each pass also removes the image's outer layer, as MRtrix3's maskfilter erode does
        raise OptionError(f"{{erode}}: {options.erode} erosions leave no voxel of a "
                          f"{'x'.join(str(n) for n in data.shape)} image (each also removes the image's outer layer, "
                          f"as MRtrix3's maskfilter erode); use erode 0 for data of fewer than "
                          f"{2 * options.erode + 1} slices", "erode")


def check_response_data(data, options) -> None:
    if not data.shells:
        raise DwiflowInputError("a response function needs a diffusion-weighted shell; this run has only b=0 volumes")


def _method(method: str, summary: str, description: str, options, run, inputs=None, outputs=_OUTPUTS,
            pipeline: bool = True, methods=None, references=(), compiled: bool = False) -> Stage:
    return Stage(name="response", method=method, order=30, title="Response function", summary=summary,
                 description=description, options=options, run=run,
                 inputs=inputs if inputs is not None else DWI_INPUTS + (_MASK,), outputs=outputs,
                 provides={"response": "response"}, pipeline=pipeline, check_data=check_response_data,
                 methods=methods, references=references, compiled=compiled)


RESPONSE = StageGroup(
    name="response", order=30, title="Response function",
    summary="response-function estimation (fa, ssst, tournier, tax, amp2response)", default="fa",
    methods={
        "fa": _method("fa", "MRtrix3 dwi2response fa: top-FA voxels of the eroded mask",
                      "The NUMBER highest-FA voxels of the eroded brain mask, principal eigenvectors as directions, "
                      "then amp2response on the largest shell (or --shells).", FaOptions, run_fa,
                      methods=lambda o: (f"A single-fibre response function was estimated from the {o.number} voxels "
                                         f"of highest FA in the brain mask eroded {o.erode} times, as MRtrix3's "
                                         "dwi2response fa"),
                      references=("tournier2004", "mrtrix3")),
        "ssst": _method("ssst", "DIPY auto_response_ssst: FA threshold in a central ROI",
                        "Tensor eigenvalues and S0 averaged over voxels with FA above a threshold in a cuboid ROI "
                        "(DIPY's mask_for_response_ssst + response_from_mask_ssst).", SsstOptions, run_ssst,
                        methods=lambda o: ("A response function was estimated from the tensors of the voxels with FA "
                                           f"above {o.fa_threshold:g} in a central box, as DIPY's "
                                           "auto_response_ssst"),
                        references=("tournier2004", "dipy")),
        "tournier": _method("tournier", "MRtrix3 dwi2response tournier (iterative, CSD-based)",
                            "Tournier et al. 2013: iterate CSD and the selection of the voxels with the largest "
                            "sqrt(p1)*(1-p2/p1)^2, ending in amp2response on the largest shell.", TournierOptions,
                            _run_iterative("tournier"),
                            methods=lambda o: ("A single-fibre response function was estimated by iterating CSD and "
                                               f"the selection of the {o.sf_voxels} most single-fibre-like voxels, as "
                                               "MRtrix3's dwi2response tournier"),
                            references=("tournier2013", "mrtrix3"), compiled=True),
        "tax": _method("tax", "recursive calibration (Tax 2014; DIPY recursive_response)",
                       "Iterate DIPY-style CSD from a fat tensor response, keeping voxels whose second peak is below "
                       "peak_thr of the first, ending in amp2response (b=0 and the shell). A --mask here is the "
                       "white matter to consider (default: every voxel).", TaxOptions, _run_iterative("tax"),
                       methods=lambda o: ("A single-fibre response function was estimated by recursive calibration "
                                          f"(second-to-first peak ratio below {o.peak_thr:g}), as DIPY's "
                                          "recursive_response"),
                       references=("tax2014", "dipy"), compiled=True),
        "amp2response": _method(
            "amp2response", "MRtrix3 amp2response from a single-fibre mask and directions",
            "Constrained least squares over all selected voxels at once (Smith, Dhollander & Connelly): one problem "
            "per shell, amplitude non-negative and increasing from the fibre axis to the orthogonal plane.",
            Amp2responseOptions, run_amp2response,
            inputs=DWI_INPUTS + (
                Input("mask", "MASK", "single-fibre voxels"),
                Input("directions_image", "DIRECTIONS", "4D image of per-voxel fibre directions (world frame)"),
                Input("directions", "FILE", "DWI volumes are amplitudes along these directions (N rows of x y z, or "
                      "azimuth elevation in radians); BVAL/BVEC are then not used", required=False, flag=True)),
            outputs=_OUTPUTS[:1], pipeline=False),
        "dhollander": Stage(
            name="response", method="dhollander", order=30, title="Response function",
            summary="MRtrix3 dwi2response dhollander: WM, GM and CSF responses for multi-tissue CSD",
            description="Dhollander et al. 2016/2019 as MRtrix3 3.0: eroded mask, signal decay metric, FA and "
                        "automatic thresholds, single-fibre WM ranked by a flat-response 2-tissue CSD (or by "
                        "--wm-algo's algorithm), then amp2response per tissue over every b-value (or --shells'; "
                        "isotropic for GM and CSF).",
            options=DhollanderOptions, run=run_dhollander, inputs=DWI_INPUTS + (_MASK,),
            outputs=(Output("wm", "the single-fibre WM response", cli="positional", metavar="OUT_WM"),
                     Output("gm", "the GM response", cli="positional", metavar="OUT_GM"),
                     Output("csf", "the CSF response", cli="positional", metavar="OUT_CSF"),
                     Output("voxels", "the voxels selected for each tissue (CSF, GM, WM volumes)", cli="flag",
                            metavar="OUT_IMAGE")),
            provides={"response_wm": "wm", "response_gm": "gm", "response_csf": "csf"},
            check_data=check_dhollander_data, threads=True, compiled=True,
            # the built-in ranking runs only the multi-tissue kernel, which calls no BLAS; -wm_algo's may
            scipy_blas=lambda o: o.wm_algo is not None,
            methods=lambda o: ("White-matter, grey-matter and CSF response functions were estimated with the "
                               f"dhollander algorithm (brain mask eroded {o.erode} times, FA threshold {o.fa:g}; "
                               f"{o.sfwm:g}% single-fibre WM, {o.gm:g}% GM and {o.csf:g}% CSF voxels kept"
                               + (f"; single-fibre WM selected by the {o.wm_algo} algorithm" if o.wm_algo else "")
                               + (f"; b-values {', '.join(f'{b:g}' for b in o.shells)}" if o.shells else "")
                               + "), as MRtrix3 3.0's dwi2response dhollander"),
            references=("dhollander2016", "dhollander2019", "mrtrix3")),
    },
)

STAGES = (RESPONSE,)
