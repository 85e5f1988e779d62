"""Stage ``mapmri``: MAP-MRI (Özarslan 2013) with Laplacian regularisation (MAPL, Fick 2016) and positivity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.options import Alias, OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, diffusion_times, provenance, sh_basis_option, voxels_to_fit, write_maps

INDICES = ("rtop", "rtap", "rtpp", "msd", "qiv", "ng", "ngpar", "ngperp")
NON_GAUSSIANITIES = ("ng", "ngpar", "ngperp")
# the standard MAP-MRI variants (Fick 2016; DIPY's tutorial) a run can compare with its own fit, as option overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "MAP": {"laplacian_weighting": 0.0, "positivity": "none"},
    "MAPL": {"laplacian_weighting": "gcv", "positivity": "none"},
    "CMAP": {"laplacian_weighting": 0.0, "positivity": "grid"},
    "CMAPL": {"laplacian_weighting": "gcv", "positivity": "grid"},
    "MAP+": {"laplacian_weighting": 0.0, "positivity": "global"},
}


@dataclass(frozen=True)
class MapmriOptions(StageOptions):
    """MAP-MRI parameters (DIPY's ``MapmriModel`` names where it has them)."""

    radial_order: int = option(6, help="even radial order (8 for isotropic ODFs)", minimum=2, maximum=12, even=True)
    anisotropic_scaling: bool = option(True, help="Hermite basis along each voxel's tensor axes (false: the isotropic "
                                                  "basis, better crossing ODFs)",
                                       aliases=(Alias("anisotropic", cli=False), Alias("isotropic", const=False,
                                                                                       spec=False)))
    laplacian_weighting: float | str = option(0.2, help="Laplacian regularisation weight, 0 for none, or gcv (per "
                                                        "voxel, generalised cross-validation)",
                                              choices=("gcv",), minimum=0, metavar="W|gcv",
                                              aliases=(Alias("laplacian_weight", spec=False),))
    positivity: str = option("none", choices=("none", "grid", "global"),
                             help="non-negative propagator at grid points (CMAP/CMAPL) or globally (MAP+, sum of "
                                  "squares)")
    pos_grid: int = option(15, help="grid points per side for grid positivity", minimum=3, maximum=41)
    pos_radius: float | str = option("adaptive", choices=("adaptive",), exclusive_minimum=True, minimum=0,
                                     help="grid radius in mm, or adaptive", units="mm")
    solver: str = option("CLARABEL", help="CVXPY solver for positivity (clarabel, scs, osqp, mosek ...)")
    big_delta: float | None = option(None, help="gradient separation Δ (default: LargeDelta of the DWI's sidecar)",
                                     exclusive_minimum=True, minimum=0, units="s")
    small_delta: float | None = option(None, help="gradient duration δ (default: SmallDelta of the DWI's sidecar)",
                                       exclusive_minimum=True, minimum=0, units="s")
    bval_threshold: float | None = option(None, help="only b below this for the tensor that sets the scales "
                                                     "(e.g. 2000 for non-Gaussianities)",
                                          exclusive_minimum=True, minimum=0)
    odf_moment: int = option(2, help="radial moment s of the ODF", minimum=0, maximum=8)
    compare: list[str] = option([], choices=tuple(VARIANTS), metavar="V1,V2",
                                help="also fit these variants and write their indices beside this fit's "
                                     "(param-compare)")
    signal: bool = option(False, help="also write the fitted signal")
    weights: bool = option(False, help="also write the per-voxel Laplacian weight (param-lambda)")
    sh_basis: str = sh_basis_option()

    def __post_init__(self) -> None:
        for name in ("laplacian_weighting", "pos_radius"):  # GCV, Adaptive: DIPY's spelling
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, value.lower())
        super().__post_init__()

    def check(self) -> None:
        if (self.big_delta is None) != (self.small_delta is None):
            raise OptionError("give both {big_delta} and {small_delta} (seconds), or neither", "big_delta",
                              "small_delta")
        if self.big_delta is not None and not self.big_delta > self.small_delta / 3:
            raise OptionError("{big_delta} must exceed {small_delta}/3", "big_delta", "small_delta")
        if not self.anisotropic_scaling and self.positivity == "global":
            raise OptionError("{positivity} global (sum of squares) needs {anisotropic_scaling}", "positivity",
                              "anisotropic_scaling")
        if not self.anisotropic_scaling and "MAP+" in self.compare:
            raise OptionError("{compare}: MAP+ (global positivity) needs {anisotropic_scaling}", "compare",
                              "anisotropic_scaling")

    def writes(self):
        names = [i for i in INDICES if self.anisotropic_scaling or i not in NON_GAUSSIANITIES] + ["lapnorm", "odf"]
        if self.weights:
            names.append("weights")
        if self.signal:
            names.append("signal")
        names.append("status")
        if self.compare:
            names.append("compare")
        return names


def _index(rows, name: str):
    """The method of a MAP-MRI fit computing index ``name`` (output names)."""
    return {"rtop": rows.rtop, "rtap": rows.rtap, "rtpp": rows.rtpp, "msd": rows.msd, "qiv": rows.qiv, "ng": rows.ng,
            "ngpar": rows.ng_parallel, "ngperp": rows.ng_perpendicular, "lapnorm": rows.laplacian_norm}[name]


def run_mapmri(files, outputs, options: MapmriOptions, context):
    """MAP-MRI fit: q-space indices, the Laplacian norm, the ODF as SH, the status (and weights, signal, the
    comparison with other variants on request). Δ/δ come from the options or the DWI's sidecar."""
    from dwiflow.core.mapmri import STATUS_CODES, STATUS_DETAILS, MapmriModel

    dwi = files["dwi"]
    big, small, times_source = diffusion_times(dwi, options.big_delta, options.small_delta)
    wants = sorted((set(INDICES) | {"compare"}) & set(outputs))
    if wants and big is None:
        raise OptionError(f"q-space indices ({', '.join(wants)}) need the diffusion times: no LargeDelta/SmallDelta in "
                          f"the sidecar of {Path(dwi).name}; give {{big_delta}} and {{small_delta}} (seconds)",
                          "big_delta", "small_delta")
    run = load_dwi(dwi, files["bval"], files["bvec"])
    common = dict(radial_order=options.radial_order, anisotropic_scaling=options.anisotropic_scaling, big_delta=big,
                  small_delta=small,
                  bval_threshold=np.inf if options.bval_threshold is None else options.bval_threshold,
                  pos_grid=options.pos_grid, pos_radius=options.pos_radius, solver=options.solver)
    model = MapmriModel(run.gtab, laplacian_weighting=options.laplacian_weighting, positivity=options.positivity,
                        **common)
    voxels = voxels_to_fit(run, files.get("mask"), dwi)
    fit = model.fit(run.data, voxels, progress=context.progress)
    compared = [(name, MapmriModel(run.gtab, **common, **VARIANTS[name]).fit(run.data, voxels,
                                                                              progress=context.progress))
                for name in options.compare]
    compare_indices = [i for i in INDICES if options.anisotropic_scaling or i not in NON_GAUSSIANITIES] + ["lapnorm"]

    def comparison() -> np.ndarray:
        columns = []
        for this in [fit] + [f for _, f in compared]:
            rows = this.rows
            for index in compare_indices:
                values = np.asarray(_index(rows, index)())
                columns.append(np.where(this.status_rows == 0, values, np.nan))
        return fit.volume(np.stack(columns, axis=-1))

    rows = fit.rows
    getters = {**{index: _index(rows, index) for index in INDICES + ("lapnorm",)},
               "weights": lambda: fit.lambdas_rows, "odf": lambda: rows.odf_sh(options.odf_moment),
               "signal": rows.fitted_signal}
    weighting = options.laplacian_weighting
    params = {"RadialOrder": model.radial_order, "Basis": "anisotropic" if options.anisotropic_scaling else "isotropic",
              "LaplacianWeighting": weighting if isinstance(weighting, str) else float(weighting),
              "Positivity": options.positivity,
              "PositivityGrid": options.pos_grid if options.positivity == "grid" else None,
              "PositivityRadius": options.pos_radius if options.positivity == "grid" else None,
              "Solver": options.solver if options.positivity != "none" else None, "BigDelta": big, "SmallDelta": small,
              "DiffusionTimesFrom": times_source, "Tau": model.tau, "BvalThreshold": options.bval_threshold,
              "OdfRadialMoment": options.odf_moment, "VoxelsFailed": int((fit.status_rows != 0).sum())}
    if options.compare:
        label = f"this run ({'MAPL' if weighting != 0 else 'MAP'}{', ' + options.positivity if options.positivity != 'none' else ''})"
        params["Compare"] = {"Fits": [label] + list(options.compare), "Indices": compare_indices,
                             "Volumes": "fit-major: volume = fit * n_indices + index",
                             "VoxelsFailed": {name: int((f.status_rows != 0).sum()) for name, f in compared}}

    def volume_of(name: str) -> np.ndarray:
        if name == "status":
            return fit.status
        if name == "compare":
            return comparison()
        values = np.asarray(getters[name]())
        fill = 0 if name == "odf" else np.nan
        # failed voxels get the fill value
        values = np.where(fit.status_rows.reshape((-1,) + (1,) * (values.ndim - 1)) == 0, values, fill)
        return fit.volume(values, fill=fill)

    return write_maps(STAGES[0], outputs, volume_of, run.affine, params,
                      provenance(dwi, files["bval"], files["bvec"], files.get("mask")), STATUS_CODES,
                      {"odf": {"SphericalHarmonicDegree": int(model.radial_order)}}, sh_basis=options.sh_basis,
                      status_details=STATUS_DETAILS)


def check_mapmri_data(data, options: MapmriOptions) -> None:
    if data.n_b0 == 0:
        raise DwiflowInputError("MAP-MRI needs b=0 volumes; this run has none")
    if data.n_dw_shells < 2:
        raise DwiflowInputError(f"MAP-MRI models the radial signal decay and needs at least two diffusion-weighted "
                                f"shells; this run has {data.n_dw_shells}")
    if options.big_delta is None and not data.has_diffusion_times:
        raise OptionError("q-space indices need the diffusion times: the DWI sidecar has no LargeDelta/SmallDelta; "
                          "give {big_delta} and {small_delta} (seconds)", "big_delta", "small_delta")


STAGES = (
    Stage(
        name="mapmri", order=60, title="MAP-MRI (Ozarslan 2013, Fick 2016)",
        methods=lambda o: (f"MAP-MRI was fitted up to radial order {o.radial_order}"
                           f"{' with anisotropic scaling' if o.anisotropic_scaling else ''}, Laplacian "
                           f"regularisation (weight {o.laplacian_weighting})"
                           f"{'' if o.positivity == 'none' else ' and the propagator constrained non-negative'}, as "
                           "DIPY's MapmriModel"),
        references=("ozarslan2013", "fick2016", "dipy"),
        summary="MAP-MRI (Ozarslan 2013) with Laplacian regularisation and positivity",
        description="Mean apparent propagator MRI: q-space indices (RTOP, RTAP, RTPP, MSD, QIV, non-Gaussianities), "
                    "the Laplacian norm, the ODF as SH and the per-voxel status, one NIfTI + sidecar each in OUT_DIR. "
                    "Delta/delta come from the DWI's JSON sidecar (LargeDelta/SmallDelta, seconds) unless given.",
        options=MapmriOptions, run=run_mapmri,
        inputs=DWI_INPUTS + (Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False,
                                   flag=True),),
        outputs=tuple(Output(name, text) for name, text in (
            ("rtop", "return-to-origin probability"), ("rtap", "return-to-axis probability"),
            ("rtpp", "return-to-plane probability"), ("msd", "mean squared displacement"),
            ("qiv", "q-space inverse variance"), ("ng", "non-Gaussianity"), ("ngpar", "parallel non-Gaussianity"),
            ("ngperp", "perpendicular non-Gaussianity"), ("lapnorm", "Laplacian norm"),
            ("weights", "Laplacian weight per voxel"), ("odf", "the ODF as SH"), ("signal", "the fitted signal"),
            ("status", "per-voxel status"), ("compare", "indices of the compared variants"))),
        provides={"fod": "odf"}, fod_priority=20, progress="voxels", check_data=check_mapmri_data,
    ),
)
