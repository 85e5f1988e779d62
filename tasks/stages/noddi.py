"""Stage ``noddi``: NODDI (Zhang 2012) as AMICO's linearised fit (Daducci 2015)."""

from __future__ import annotations

from dataclasses import dataclass

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.options import option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, MapOptions, provenance, voxels_to_fit, write_maps

_HELP = {"icvf": "intra-cellular volume fraction (neurite density index, NDI)",
         "odi": "orientation dispersion index", "isovf": "isotropic (free-water) volume fraction",
         "direction": "fibre direction the dictionary was rotated to (principal tensor eigenvector)",
         "status": "per-voxel fit status"}


@dataclass(frozen=True)
class NoddiOptions(MapOptions):
    """NODDI's fixed diffusivities and the sparse fit's penalties (AMICO's defaults), and which maps a run writes."""

    d_par: float = option(1.7e-3, exclusive_minimum=True, minimum=0, maximum=5e-3, units="mm²/s",
                          help="intrinsic parallel diffusivity of neurites (AMICO's dPar; ex vivo data need less)")
    d_iso: float = option(3.0e-3, exclusive_minimum=True, minimum=0, maximum=5e-3, units="mm²/s",
                          help="diffusivity of the isotropic compartment (AMICO's dIso)")
    lambda1: float = option(0.5, minimum=0, help="ℓ1 weight of the elastic net that selects atoms (AMICO's)")
    lambda2: float = option(1e-3, exclusive_minimum=True, minimum=0,
                            help="ℓ2 weight of the elastic net (AMICO's)")
    maps: list[str] = option(["icvf", "odi", "isovf", "status"], choices=tuple(_HELP), cli=False,
                             help="maps a run writes (on the command line: one option per map)")


def run_noddi(files, outputs, options: NoddiOptions, context):
    """Fit NODDI (Zhang 2012) as AMICO does (Daducci 2015) and write the requested maps."""
    from dwiflow.core.noddi import ICVF_GRID, LMAX, OD_GRID, STATUS_CODES, NoddiModel

    run = load_dwi(files["dwi"], files["bval"], files["bvec"])
    model = NoddiModel(run.gtab, d_par=options.d_par, d_iso=options.d_iso, lambda1=options.lambda1,
                       lambda2=options.lambda2)
    voxels = voxels_to_fit(run, files.get("mask"), files["dwi"])
    fit = model.fit(run.data, voxels, n_threads=context.n_threads, progress=context.progress)
    maps = {"icvf": lambda: fit.ndi, "odi": lambda: fit.odi, "isovf": lambda: fit.fwf,
            "direction": lambda: fit.direction, "status": lambda: fit.status}
    parameters = {"Method": "AMICO (linearised NODDI: dictionary, NNLS, non-negative elastic net, NNLS)",
                  "ParallelDiffusivity": options.d_par, "IsotropicDiffusivity": options.d_iso,
                  "Lambda1": options.lambda1, "Lambda2": options.lambda2,
                  "IntraCellularFractions": [round(float(v), 6) for v in ICVF_GRID],
                  "OrientationDispersions": [round(float(v), 6) for v in OD_GRID],
                  "KernelLegendreDegree": LMAX,
                  "Shells": sorted({round(float(b)) for b in run.gtab.bvals[~run.gtab.b0s_mask]}),
                  "VoxelsFailed": int(((fit.status != 0) & fit.mask).sum())}
    orientation = {"direction": {"Type": "unit3vector", "Reference": "xyz"}}
    return write_maps(STAGES[0], outputs, lambda name: maps[name](), run.affine, parameters,
                      provenance(files["dwi"], files["bval"], files["bvec"], files.get("mask")), STATUS_CODES,
                      orientation=orientation)


def check_noddi_data(data, options: NoddiOptions) -> None:
    if data.n_b0 == 0:
        raise DwiflowInputError("NODDI needs b=0 volumes (the signal is normalised by their mean); none found")
    if data.n_dw_shells < 2:
        raise DwiflowInputError(f"NODDI needs at least two diffusion-weighted shells (one shell cannot separate the "
                                f"intra- from the extra-neurite signal); this run has {data.n_dw_shells}")


STAGES = (
    Stage(
        name="noddi", order=75, title="NODDI (Zhang 2012; AMICO, Daducci 2015)",
        methods=lambda o: ("NODDI was fitted with AMICO's convex linearisation (a dictionary of Watson-dispersed "
                           f"stick and hindered signals, parallel diffusivity {o.d_par:g} mm²/s, isotropic "
                           f"diffusivity {o.d_iso:g} mm²/s, along the principal tensor direction; non-negative least "
                           "squares and a non-negative elastic net)"),
        references=("zhang2012", "daducci2015"),
        summary="NODDI (ICVF/NDI, ODI, ISOVF) as AMICO's linearised fit",
        description="Neurite orientation dispersion and density imaging (Zhang et al. 2012) fitted as AMICO 2.x "
                    "does (Daducci et al. 2015): the signal over the mean b=0 as a non-negative combination of "
                    "Watson-dispersed stick + hindered atoms (12 dispersions x 12 intra-cellular fractions, along "
                    "the principal tensor direction) and an isotropic atom; NNLS, a non-negative elastic net that "
                    "selects atoms, and NNLS on those. Needs b=0 and two shells. Give one option per map to write.",
        options=NoddiOptions, run=run_noddi,
        inputs=DWI_INPUTS + (Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False,
                                   flag=True),),
        outputs=tuple(Output(name, f"the {text} map", cli="flag") for name, text in _HELP.items()),
        check_data=check_noddi_data, scipy_blas=False, threads=True, compiled=True, progress="voxels",
    ),
)
