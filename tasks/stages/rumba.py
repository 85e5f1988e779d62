"""Stage ``rumba``: RUMBA-SD deconvolution (Canales-Rodríguez et al. 2015), voxelwise or global with TV."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from dwiflow.core.defaults import RUMBA_CSF_DIFFUSIVITY, RUMBA_GM_DIFFUSIVITY, RUMBA_WM_RESPONSE
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.sphere import SPHERES
from dwiflow.tasks.io import existing_file, load_dwi, sidecar_path
from dwiflow.tasks.options import Alias, OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, provenance, sh_basis_option, voxels_to_fit, write_maps


@dataclass(frozen=True)
class RumbaOptions(StageOptions):
    """RUMBA-SD parameters (DIPY's ``RumbaSDModel`` names and defaults, except where said)."""

    wm_response: list[float] | str | None = option(
        None, metavar="L1,L2,L3|FILE",
        help="white-matter tensor eigenvalues in mm²/s (three, or three per shell), or a response file with "
             f"eigenvalues in its sidecar (dwirecon response ssst); default {','.join(f'{v:g}' for v in RUMBA_WM_RESPONSE)}",
        minimum=0)
    use_response: bool = option(True, cli=False,
                                help="in a run with an SSST response stage, use its eigenvalues as the white-matter "
                                     "response")
    gm_response: float | None = option(RUMBA_GM_DIFFUSIVITY, help="grey-matter mean diffusivity; none leaves GM out",
                                       exclusive_minimum=True, minimum=0, units="mm²/s")
    csf_response: float | None = option(RUMBA_CSF_DIFFUSIVITY, help="CSF mean diffusivity; none leaves CSF out",
                                        exclusive_minimum=True, minimum=0, units="mm²/s")
    n_iter: int = option(600, help="iterations", minimum=1)
    recon_type: str = option("smf", choices=("smf", "sos"),
                             help="smf: Rician noise (SENSE/spatial matched filter); sos: noncentral chi (sum of "
                                  "squares, needs n_coils)")
    n_coils: int | None = option(None, help="receiver coils (sos)", minimum=1)
    R: int = option(1, help="acceleration factor (GRAPPA/SENSE/ASSET)", minimum=1)
    global_fit: bool = option(False, help="global fit of the whole volume (needs a 3D volume)",
                              aliases=(Alias("global", const=True, spec=False),))
    use_tv: bool = option(False, help="total-variation regularisation (with global_fit)",
                          aliases=(Alias("tv", const=True, spec=False),))
    sphere: str = option("repulsion724", choices=tuple(SPHERES), help="sphere of the fODF")
    sh_lmax: int = option(8, help="SH degree of the fODF output", minimum=2, maximum=16, even=True)
    precision: str = option("float32", choices=("float32", "float64"), help="arithmetic of the iterations")
    amplitudes: bool = option(False, help="also write the fODF on the sphere (one volume per direction)")
    sh_basis: str = sh_basis_option()

    def check(self) -> None:
        if self.use_tv and not self.global_fit:
            raise OptionError("{use_tv} needs the global fit ({global_fit})", "use_tv", "global_fit")
        if self.recon_type == "sos" and self.n_coils is None:
            raise OptionError("{recon_type} sos (noncentral chi noise) needs {n_coils}", "recon_type", "n_coils")
        if isinstance(self.wm_response, list) and (len(self.wm_response) % 3 or not self.wm_response):
            raise OptionError(f"{{wm_response}}: give three eigenvalues (or three per shell), got "
                              f"{len(self.wm_response)} values", "wm_response")

    def writes(self):
        skip = set() if self.amplitudes else {"fod_amplitudes"}
        if self.gm_response is None:
            skip.add("fgm")
        if self.csf_response is None:
            skip.add("fcsf")
        return [o.name for o in STAGES[0].outputs if o.name not in skip]


def read_wm_response(value) -> tuple[list[float], str]:
    """White-matter response: eigenvalues (3, or 3 per shell) or a response file whose JSON sidecar holds
    ``Eigenvalues`` (as ``dwirecon response ssst`` writes). Returns the values and a description."""
    if value is None:
        return list(RUMBA_WM_RESPONSE), "default"
    if isinstance(value, (str, os.PathLike)):
        p = existing_file(value, "white-matter response")
        side = sidecar_path(p)
        try:
            evals = json.loads(side.read_text())["Eigenvalues"] if side.is_file() else None
        except (ValueError, KeyError):
            evals = None
        if evals is None:
            raise DwiflowInputError(f"white-matter response {p} has no tensor eigenvalues in its sidecar {side.name}; "
                                    "RUMBA-SD needs eigenvalues (e.g. from `dwirecon response ssst`) or three numbers",
                                    parameters=("wm_response",))
        return [float(v) for v in evals], f"eigenvalues from {p.name}"
    return [float(v) for v in np.ravel(value)], "given"


def run_rumba(files, outputs, options: RumbaOptions, context):
    """RUMBA-SD fit: the fODF as SH (MRtrix3 basis, world frame) and, if asked, on the model sphere; fractions,
    the SNR estimate and a status map."""
    from dwiflow.core.rumba import STATUS_CODES, RumbaSDModel

    dwi = files["dwi"]
    wm_source = files.get("response") or options.wm_response
    evals, evals_source = read_wm_response(wm_source)
    run = load_dwi(dwi, files["bval"], files["bvec"])
    n_dw_shells = len(run.gtab.dw_shells)
    evals_arr = np.asarray(evals, dtype=float)
    if evals_arr.size == 3 * n_dw_shells and evals_arr.size != 3:
        evals_arr = evals_arr.reshape(n_dw_shells, 3)
    model = RumbaSDModel(run.gtab, wm_response=evals_arr, gm_response=options.gm_response,
                         csf_response=options.csf_response, n_iter=options.n_iter, recon_type=options.recon_type,
                         n_coils=options.n_coils, R=options.R, sphere=options.sphere, voxelwise=not options.global_fit,
                         use_tv=options.use_tv, precision=options.precision, n_threads=context.n_threads)
    voxels = voxels_to_fit(run, files.get("mask"), dwi)
    fit = model.fit(run.data, voxels, progress=context.progress)
    lmax = options.sh_lmax
    sh_rows = fit.odf_sh_rows(lmax) if {"fod", "combined_odf"} & set(outputs) else None
    maps = {
        "fod": lambda: np.nan_to_num(fit.volume(sh_rows, fill=0.0)),
        "fod_amplitudes": fit.odf,
        "combined_odf": lambda: np.nan_to_num(fit.combined_odf_sh(lmax, sh_rows)),
        "fwm": lambda: fit.f_wm, "fiso": lambda: fit.f_iso, "fgm": lambda: fit.f_gm, "fcsf": lambda: fit.f_csf,
        "snr": fit.snr, "status": lambda: fit.status,
    }
    params = {
        "WhiteMatterResponse": np.asarray(model.wm_response).tolist(), "WhiteMatterResponseSource": evals_source,
        "GreyMatterDiffusivity": options.gm_response, "CsfDiffusivity": options.csf_response,
        "Iterations": model.n_iter, "ReconType": options.recon_type, "NoiseOrder": model.order,
        "AccelerationFactor": options.R, "Fit": "global" if options.global_fit else "voxelwise",
        "TotalVariation": options.use_tv, "Sphere": options.sphere, "SphereDirections": int(model.vertices.shape[0]),
        "Precision": options.precision, "VoxelsFailed": int((fit.status_rows != 0).sum()),
    }
    sources = provenance(dwi, files["bval"], files["bvec"], files.get("mask"),
                         wm_source if isinstance(wm_source, (str, os.PathLike)) else None)
    orientation = {"fod": {"SphericalHarmonicDegree": int(lmax)},
                   "combined_odf": {"SphericalHarmonicDegree": int(lmax)},
                   "fod_amplitudes": {"AmplitudesDirections": np.round(model.vertices, 8).tolist()}}
    return write_maps(STAGES[0], outputs, lambda name: maps[name](), run.affine, params, sources, STATUS_CODES,
                      orientation, sh_basis=options.sh_basis)


def check_rumba_data(data, options: RumbaOptions) -> None:
    if data.n_b0 == 0 or not data.shells:
        raise DwiflowInputError("RUMBA-SD needs b=0 and diffusion-weighted volumes (the signal is normalised by the "
                                "mean b=0)")


def _uses_ssst_response(spec) -> bool:
    """A run's SSST response (tensor eigenvalues) replaces RUMBA-SD's default white-matter response."""
    return spec.options("rumba").use_response and spec.method("response") == "ssst"


STAGES = (
    Stage(
        name="rumba", order=50, title="RUMBA-SD (Canales-Rodriguez 2015)",
        methods=lambda o: (f"Fibre ODFs were estimated with RUMBA-SD ({o.n_iter} iterations on the {o.sphere} "
                           f"sphere{', with total-variation regularisation across voxels' if o.use_tv else ''}), as "
                           "DIPY's RumbaSDModel"),
        references=("canales2015", "dipy"),
        summary="RUMBA-SD deconvolution (Canales-Rodriguez 2015), voxelwise or global + TV",
        description="Robust and unbiased model-based spherical deconvolution: fODF on a dense sphere plus GM/CSF "
                    "isotropic fractions under Rician (smf) or noncentral-chi (sos) noise. Writes every map (fODF as "
                    "SH, combined ODF, fractions, SNR, status; the fODF amplitudes with --amplitudes) into OUT_DIR, "
                    "named from the DWI's BIDS entities.",
        options=RumbaOptions, run=run_rumba,
        inputs=DWI_INPUTS + (
            Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False, flag=True),
            Input("response", "RESPONSE", "SSST response whose eigenvalues are the white-matter response",
                  required=False, cli=False, when=_uses_ssst_response)),
        outputs=(Output("fod", "the fODF as SH"), Output("fod_amplitudes", "the fODF on the model sphere"),
                 Output("combined_odf", "the fODF plus the isotropic part, as SH"),
                 Output("fwm", "white-matter fraction"), Output("fiso", "isotropic fraction"),
                 Output("fgm", "grey-matter fraction"), Output("fcsf", "CSF fraction"),
                 Output("snr", "estimated SNR"), Output("status", "per-voxel status")),
        provides={"fod": "fod"}, fod_priority=40, conflicts=("csd",), threads=True, progress="voxels",
        check_data=check_rumba_data,
    ),
)
