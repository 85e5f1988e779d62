"""Stage ``peaks``: FOD peaks in MRtrix3's sh2peaks layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.bids_specs.outputs import sidecar
from dwiflow.core.defaults import PEAKS_MIN_SEPARATION, PEAKS_NUMBER, PEAKS_REL_THRESHOLD
from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import atomic_outputs, load_mask, read_sidecar, sidecar_path
from dwiflow.tasks.options import Alias, OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import fod_model_of, load_sh_image, provenance


@dataclass(frozen=True)
class PeaksOptions(StageOptions):
    """Peak search parameters (MRtrix3 ``sh2peaks``: -num, -threshold; a relative threshold and a separation)."""

    npeaks: int = option(PEAKS_NUMBER, help="peaks per voxel", minimum=1, maximum=10)
    rel_threshold: float = option(PEAKS_REL_THRESHOLD, minimum=0, maximum=1,
                                  help="minimum amplitude relative to the largest peak (0.1 keeps the equatorial "
                                       "ringing of lmax-8 CSD as spurious peaks)")
    threshold: float = option(0.0, help="minimum absolute amplitude", minimum=0,
                              aliases=(Alias("abs_threshold", cli=False),))
    min_separation: float = option(PEAKS_MIN_SEPARATION, help="minimum angle between peaks", minimum=0, maximum=90,
                                   units="degrees", aliases=(Alias("min_separation_deg", cli=False),))
    subtract_psf: bool = option(False, help="find peaks after the first by subtracting the FOD's point-spread "
                                            "function (from its sidecar; CSD writes it): resolves fibres 30-50 deg "
                                            "apart whose lobes merge")
    search: str = option("dense", choices=("dense", "sh2peaks"),
                         help="dense: local maxima on a dense sphere, kept by rel_threshold and min_separation; "
                              "sh2peaks: MRtrix3's sh2peaks search (Newton ascents from its 60 seeds, peaks closer "
                              "than 8.1 deg merged, sorted by amplitude; only npeaks and threshold apply, threshold "
                              "0 being sh2peaks -threshold 0)")

    def check(self) -> None:
        if self.search == "sh2peaks" and self.subtract_psf:
            raise OptionError("{subtract_psf}: not with search sh2peaks (MRtrix3's search has no such step)",
                              "subtract_psf")


def fod_point_spread_function(fod, lmax: int) -> np.ndarray:
    """The point-spread function (zonal coefficients) that CSD wrote into an FOD's sidecar."""
    side = sidecar_path(fod)
    entry = (read_sidecar(fod) or {}).get("PointSpreadFunction")
    if entry is None:
        raise DwiflowInputError(f"subtract_psf needs the FOD's point-spread function in its sidecar {side.name} "
                                f"(dwirecon csd writes it); {fod} has none", parameters=("subtract_psf",))
    coefficients = np.asarray(entry.get("Coefficients", []) if isinstance(entry, dict) else [], dtype=float)
    if coefficients.shape != (lmax // 2 + 1,) or not np.all(np.isfinite(coefficients)):
        raise DwiflowInputError(f"the FOD's sidecar {side} has a PointSpreadFunction that is not {lmax // 2 + 1} "
                                f"finite zonal coefficients (the FOD's degree is {lmax})")
    return coefficients


def run_peaks(files, outputs, options: PeaksOptions, context):
    """FOD peaks: 3×npeaks volumes of amplitude-scaled vectors, NaN where absent (local maxima as MRtrix3's
    sh2peaks; with subtract_psf, CLEAN-style subtraction of each fibre's image, Högbom 1974)."""
    from dwiflow.core.peaks import find_peaks, sh2peaks

    fod, mask = files["fod"], files.get("mask")
    sh, affine, lmax = load_sh_image(fod)
    voxels = load_mask(mask, sh.shape[:3], affine) if mask is not None else None
    if options.search == "sh2peaks":
        vectors = np.full(sh.shape[:3] + (options.npeaks, 3), np.nan)
        inside = voxels if voxels is not None else np.ones(sh.shape[:3], dtype=bool)
        vectors[inside] = sh2peaks(sh[inside], npeaks=options.npeaks, threshold=options.threshold)
        params = {"NumberOfPeaks": options.npeaks, "AbsoluteThreshold": options.threshold,
                  "Method": "MRtrix3 sh2peaks search (Newton ascents from 60 seeds)"}
    else:
        psf = fod_point_spread_function(fod, lmax) if options.subtract_psf else None
        vectors = find_peaks(sh, voxels, npeaks=options.npeaks, rel_threshold=options.rel_threshold,
                             abs_threshold=options.threshold, min_separation_deg=options.min_separation,
                             psf=psf).vectors
        params = {"NumberOfPeaks": options.npeaks, "RelativeThreshold": options.rel_threshold,
                  "AbsoluteThreshold": options.threshold, "MinSeparationDegrees": options.min_separation,
                  "Method": "point-spread-function subtraction" if psf is not None else "local maxima"}
    with atomic_outputs() as out:
        path = out.nifti(outputs["peaks"], vectors.reshape(sh.shape[:3] + (3 * options.npeaks,)), affine,
                         sidecar("peaks", params, **fod_model_of(fod), **provenance(fod, mask)))
    return {"peaks": path}


STAGES = (
    Stage(
        name="peaks", order=80, title="FOD peaks", summary="FOD peaks, MRtrix3 sh2peaks layout",
        methods=lambda o: (f"Up to {o.npeaks} FOD peaks per voxel (amplitude above {o.threshold:g}) were found by "
                           "MRtrix3's sh2peaks search (Newton ascents from 60 seed directions)"
                           if o.search == "sh2peaks" else
                           f"Up to {o.npeaks} FOD peaks per voxel were found as local maxima of the amplitude, "
                           f"kept above {o.rel_threshold:g} of the largest and at least {o.min_separation:g} degrees "
                           "apart"),
        references=("mrtrix3",),
        description="Local maxima of the FOD on a dense sphere, refined to sub-degree accuracy (as MRtrix3's "
                    "sh2peaks); with --subtract-psf, peaks after the first are the maxima left after subtracting the "
                    "deconvolution's fitted image of each fibre found.",
        options=PeaksOptions, run=run_peaks, compiled=True,
        inputs=(Input("fod", "FOD", "FOD (SH image, MRtrix3 basis)"),
                Input("mask", "MASK", "voxels to search (default: all)", required=False, flag=True)),
        outputs=(Output("peaks", "the peaks", cli="positional", metavar="OUT_PEAKS"),),
        provides={"peaks": "peaks"},
    ),
)
