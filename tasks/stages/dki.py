"""Stage ``dki``: diffusion kurtosis imaging (Jensen 2005) and its maps, as DIPY's DiffusionKurtosisModel."""

from __future__ import annotations

from dataclasses import dataclass

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import DEFAULT_SHELL_TOLERANCE as SHELL_TOLERANCE
from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.options import OptionError, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import (DWI_INPUTS, MapOptions, on_shells, provenance, stage_warnings, thread_count,
                                    voxels_to_fit, write_maps)

# s/mm²: about where the kurtosis expansion stops describing brain tissue (Jensen & Helpern 2010)
KURTOSIS_RANGE = 3000.0

_HELP = {"mk": "mean kurtosis", "ak": "axial kurtosis", "rk": "radial kurtosis",
         "mkt": "mean of the kurtosis tensor", "kfa": "kurtosis fractional anisotropy",
         "fa": "fractional anisotropy of the same fit's tensor", "md": "mean diffusivity", "ad": "axial diffusivity",
         "rd": "radial diffusivity", "s0": "fitted S0",
         "kurtosis": "kurtosis tensor (15 unique elements, W1111 W1112 W1113 W1122 …, order in the sidecar)",
         "tensor": "diffusion tensor (6 elements, BEP016 order D11 D12 D13 D22 D23 D33)",
         "status": "per-voxel fit status"}
METHODS = ("dipy-wls", "dipy-ols", "dipy-cwls", "dipy-cls", "wls", "ols")
DEFAULT_MAPS = ["mk", "ak", "rk", "mkt", "kfa", "fa", "md", "ad", "rd", "status"]


@dataclass(frozen=True)
class DkiOptions(MapOptions):
    """How the kurtosis model is fitted (as DIPY's DiffusionKurtosisModel) and which maps a run writes."""

    method: str = option("dipy-wls", choices=METHODS,
                         help="dipy-wls/dipy-ols: DIPY's DiffusionKurtosisModel WLS (weights from an OLS first pass; "
                              "DIPY's default) or OLS, eigenvalues clipped as DIPY; dipy-cwls/dipy-cls: the same "
                              "subject to DIPY's constraint (CWLS/CLS, Dela Haije 2020: a sum-of-squares "
                              "certificate of non-negative diffusivities and kurtosis; a semidefinite program per "
                              "voxel that needs it, slower); wls/ols: MRtrix3's dwi2tensor "
                              "-dkt, a first fit weighted by the measured signal (wls) or unweighted (ols), then "
                              "`iter` refits weighted by the predicted signal (as the tensor stage's wls/ols)")
    bmax: float | None = option(None, exclusive_minimum=True, minimum=0, units="s/mm²",
                                help="fit the b=0 volumes and only the shells up to this b-value (a shell's mean "
                                     f"b-value, within {SHELL_TOLERANCE:g} s/mm²): the kurtosis model describes brain "
                                     "tissue to about "
                                     "b=2500-3000 (Jensen & Helpern 2010); default: every shell, as DIPY and "
                                     "dwi2tensor -dkt")
    iter: int = option(2, minimum=0, maximum=10,
                       help="reweighted refits after the first fit (dwi2tensor -iter; 0 and 1 both keep the first "
                            "fit; wls/ols only)")
    maps: list[str] = option(list(DEFAULT_MAPS), choices=tuple(_HELP), cli=False,
                             help="maps a run writes (on the command line: one option per map)")


def run_dki(files, outputs, options: DkiOptions, context):
    """Fit the kurtosis model (Jensen 2005) by OLS or WLS as DIPY and write the requested maps (MK/AK/RK as Tabesh
    2011, MKT as Hansen 2013, KFA as Glenn 2015)."""
    from dwiflow.core.dki import (BEP016_KURTOSIS_ORDER, KURTOSIS_ELEMENT_NAMES, MAX_KURTOSIS, MIN_KURTOSIS,
                                  STATUS_CODES, STATUS_DETAILS, DiffusionKurtosisModel)

    from dwiflow.tasks.preflight import summary_of

    run = load_dwi(files["dwi"], files["bval"], files["bvec"])
    # a BIDS App run's recon-spec checks ran before any stage; a command's run here, before fitting
    check_dki_data(summary_of(run.gtab, None, False), options)
    notes = stage_warnings(STAGES[0], run, files["dwi"], options, files.get("mask") is not None)
    threads = thread_count(context)
    data, gtab, _ = on_shells(run, [s.bvalue for s in run.gtab.shells if s.is_b0 or _fitted(s.bvalue, options)])
    if options.method.startswith("dipy-"):
        model = DiffusionKurtosisModel(gtab, fit_method=options.method.removeprefix("dipy-").upper(),
                                       n_threads=threads)
        how = {"FitMethod": f"DIPY DiffusionKurtosisModel {options.method.removeprefix('dipy-').upper()}",
               "MinDiffusivity": model.min_diffusivity}
    else:
        model = DiffusionKurtosisModel(gtab, fit_method="IWLS", iterations=options.iter,
                                       ols_start=options.method == "ols", n_threads=threads)
        how = {"FitMethod": f"MRtrix3 dwi2tensor -dkt: first fit {options.method.upper()}, then IWLS",
               "Iterations": options.iter if options.iter > 1 else 0}
    voxels = voxels_to_fit(run, files.get("mask"), files["dwi"])
    fit = model.fit(data, voxels, progress=context.progress)
    maps = {"mk": lambda: fit.mk, "ak": lambda: fit.ak, "rk": lambda: fit.rk, "mkt": lambda: fit.mkt,
            "kfa": lambda: fit.kfa, "fa": lambda: fit.fa, "md": lambda: fit.md, "ad": lambda: fit.ad,
            "rd": lambda: fit.rd, "s0": lambda: fit.s0_map, "kurtosis": lambda: fit.kurtosis_elements,
            "tensor": lambda: fit.elements, "status": lambda: fit.status}
    parameters = {**how, "KurtosisClippedTo": [MIN_KURTOSIS, MAX_KURTOSIS],
                  "ShellBvalues": sorted({round(float(b)) for b in gtab.bvals}), "Bmax": options.bmax,
                  "VoxelsFailed": int(((fit.status != 0) & fit.mask).sum())}
    per_output = {"kurtosis": {"TensorElementOrder": list(KURTOSIS_ELEMENT_NAMES),
                               "TensorElementIndices": [list(i) for i in BEP016_KURTOSIS_ORDER]}}
    return write_maps(STAGES[0], outputs, lambda name: maps[name](), run.affine, parameters,
                      provenance(files["dwi"], files["bval"], files["bvec"], files.get("mask")) | notes, STATUS_CODES,
                      per_output=per_output, status_details=STATUS_DETAILS)


def _fitted(bvalue: float, options: DkiOptions) -> bool:
    """Whether the fit uses the diffusion-weighted shell of this b-value (those up to ``bmax`` when it is given)."""
    return options.bmax is None or bvalue <= options.bmax + SHELL_TOLERANCE


def _fitted_shells(data, options: DkiOptions) -> list[float]:
    """The diffusion-weighted shells' b-values the fit uses."""
    return [b for b, _ in data.shells if _fitted(b, options)]


def check_dki_data(data, options: DkiOptions) -> None:
    shells = _fitted_shells(data, options)
    if len(shells) + (1 if data.n_b0 else 0) < 3:
        have = ", ".join(["b=0"] * bool(data.n_b0) + [f"b={b:g}" for b, _ in data.shells]) or "none"
        if options.bmax is not None and len(shells) < data.n_dw_shells:
            kept = ", ".join(["b=0"] * bool(data.n_b0) + [f"b={b:g}" for b in shells]) or "none"
            raise OptionError(f"{{bmax}}: DKI needs at least three distinct b-values (b=0 counts), but up to "
                              f"b={options.bmax:g} this run has {kept} (all of it: {have})", "bmax")
        raise DwiflowInputError(f"DKI needs at least three distinct b-values (b=0 counts; e.g. b=0 and two shells): "
                                f"this run has {have}")


def dki_data_warnings(data, options: DkiOptions) -> list[str]:
    """Shells beyond the kurtosis model's range: it expands the log-signal to second order in b, which describes
    brain tissue to about b=2500-3000 s/mm² (Jensen & Helpern 2010); higher shells bias the maps towards the
    sampling."""
    shells = _fitted_shells(data, options)
    if options.bmax is not None or not shells or max(shells) <= KURTOSIS_RANGE + SHELL_TOLERANCE:
        return []
    limit = f"{KURTOSIS_RANGE:.0f}"
    return [f"DKI fits every shell, up to b={max(shells):.0f} s/mm²: the kurtosis model describes brain tissue to "
            f"about b={limit} (Jensen & Helpern 2010), so the maps depend on the higher shells; the bmax option "
            f"(dwirecon dki --bmax {limit}; in a recon spec, dki: {{bmax: {limit}}}) fits those up to it"]


def _methods_sentence(options: DkiOptions) -> str:
    used = (f" (the b=0 volumes and the shells up to b={options.bmax:g} s/mm²)"
            if options.bmax is not None else "")
    if options.method.startswith("dipy-"):
        how = {"dipy-wls": "weighted linear least squares with weights from an ordinary least-squares fit, as "
                           "DIPY's DiffusionKurtosisModel",
               "dipy-ols": "ordinary linear least squares, as DIPY's DiffusionKurtosisModel",
               "dipy-cwls": "weighted linear least squares with weights from an ordinary least-squares fit, "
                            "constrained to non-negative diffusivities and kurtosis by a sum-of-squares linear "
                            "matrix inequality (Dela Haije et al. 2020), as DIPY's DiffusionKurtosisModel CWLS",
               "dipy-cls": "ordinary linear least squares constrained to non-negative diffusivities and kurtosis by "
                           "a sum-of-squares linear matrix inequality (Dela Haije et al. 2020), as DIPY's "
                           "DiffusionKurtosisModel CLS"}[options.method]
    else:
        first = "weighted by the measured signal" if options.method == "wls" else "unweighted"
        refits = (f", then refitted {options.iter} times with weights from the predicted signal" if options.iter > 1
                  else "")
        how = f"linear least squares ({first}{refits}), as MRtrix3's dwi2tensor -dkt"
    return (f"The diffusion kurtosis model was fitted to the log-signal{used} by {how}; "
            "mean, axial and radial kurtosis were computed analytically, with the mean of the kurtosis tensor and "
            "the kurtosis fractional anisotropy")


STAGES = (
    Stage(
        name="dki", order=25, title="Diffusion kurtosis (Jensen 2005)",
        methods=_methods_sentence,
        references=lambda o: ("jensen2005", "tabesh2011", "hansen2013", "glenn2015")
        + (("dipy",) if o.method.startswith("dipy-") else ("veraart2013", "mrtrix3"))
        + (("delahaije2020",) if o.method in ("dipy-cls", "dipy-cwls") else ())
        + (("jensen2010",) if o.bmax is not None else ()),
        summary="diffusion kurtosis imaging: MK, AK, RK, MKT, KFA and the tensor of the same fit",
        description="Diffusion and kurtosis tensors fitted to the log-signal (Jensen et al. 2005) by OLS or WLS "
                    "as DIPY's DiffusionKurtosisModel (default; or constrained as its CLS/CWLS), or as MRtrix3's "
                    "dwi2tensor -dkt; mean, axial and radial kurtosis in closed form "
                    "(Tabesh et al. 2011), mean of the kurtosis tensor (Hansen et al. 2013), kurtosis fractional "
                    "anisotropy (Glenn et al. 2015). Needs b=0 and two shells (or three shells). Give one option per "
                    "map to write.",
        options=DkiOptions, run=run_dki,
        inputs=DWI_INPUTS + (Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False,
                                   flag=True),),
        outputs=tuple(Output(name, f"the {text} map", cli="flag") for name, text in _HELP.items()),
        check_data=check_dki_data, data_warnings=dki_data_warnings, scipy_blas=False, threads=True, progress="voxels",
    ),
)
