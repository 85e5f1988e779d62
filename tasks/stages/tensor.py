"""Stage ``tensor``: the diffusion tensor and its scalar maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.options import OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, provenance, voxels_to_fit, write_maps

TENSOR_MAPS = ("fa", "md", "ad", "rd", "v1", "s0", "evals", "status")


@dataclass(frozen=True)
class TensorOptions(StageOptions):
    """How the tensor is fitted, and which maps a run writes."""

    outputs_option: ClassVar[str | None] = "maps"
    method: str = option("wls", help="weighted (Chung 2006: weights from an OLS first pass) or ordinary least "
                                     "squares on the log-signal", choices=("wls", "ols"))
    maps: list[str] = option(["fa", "md", "ad", "rd", "v1", "s0", "status"], choices=TENSOR_MAPS, cli=False,
                             help="maps a run writes (on the command line: one option per map)")

    def __post_init__(self) -> None:
        if isinstance(self.method, str):  # WLS / OLS as the command line spelled them before
            object.__setattr__(self, "method", self.method.lower())
        super().__post_init__()

    def check(self) -> None:
        if not self.maps:
            raise OptionError("{maps}: give at least one map", "maps")

    def writes(self):
        return self.maps


def run_tensor(files, outputs, options: TensorOptions, context):
    """Fit the tensor (Basser 1994; WLS as Chung 2006) and write the requested maps."""
    from dwiflow.core.tensor import MIN_POSITIVE_SIGNAL, STATUS_CODES, TensorModel

    run = load_dwi(files["dwi"], files["bval"], files["bvec"])
    voxels = voxels_to_fit(run, files.get("mask"), files["dwi"])
    fit_method = options.method.upper()
    fit = TensorModel(run.gtab, fit_method=fit_method).fit(run.data, voxels)
    maps = {"fa": fit.fa, "md": fit.md, "ad": fit.ad, "rd": fit.rd, "v1": fit.v1, "s0": fit.s0, "evals": fit.evals,
            "status": fit.status}
    parameters = {"FitMethod": fit_method, "MinSignal": MIN_POSITIVE_SIGNAL}
    return write_maps(STAGES[0], outputs, maps.__getitem__, run.affine, parameters,
                      provenance(files["dwi"], files["bval"], files["bvec"], files.get("mask")), STATUS_CODES)


_HELP = {"fa": "fractional anisotropy", "md": "mean diffusivity", "ad": "axial diffusivity",
         "rd": "radial diffusivity", "v1": "principal eigenvector (world frame)", "s0": "fitted S0",
         "evals": "eigenvalues (3 volumes, largest first)", "status": "per-voxel fit status"}

STAGES = (
    Stage(
        name="tensor", order=20, title="Diffusion tensor",
        summary="diffusion tensor fit and its maps",
        description="Least-squares tensor fit on the log-signal (Basser et al. 1994); WLS weights from an OLS "
                    "first pass (Chung et al. 2006). Give one option per map to write.",
        options=TensorOptions, run=run_tensor,
        inputs=DWI_INPUTS + (Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False,
                                   flag=True),),
        outputs=tuple(Output(name, f"the {text} map", cli="flag") for name, text in _HELP.items()),
    ),
)
