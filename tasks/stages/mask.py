"""Stage ``mask``: a brain mask, by median-Otsu on the b=0 volumes or as MRtrix3's ``dwi2mask``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.bids_specs.outputs import sidecar
from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import atomic_outputs, load_dwi
from dwiflow.tasks.options import StageOptions, option
from dwiflow.tasks.registry import Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, provenance


@dataclass(frozen=True)
class MaskOptions(StageOptions):
    """The algorithm, and its parameters (median-Otsu: DIPY's ``median_otsu`` names and defaults; mrtrix:
    ``dwi2mask``'s)."""

    method: str = option("median-otsu", choices=("median-otsu", "mrtrix"),
                         help="median-otsu: the mean b=0 image, median-filtered, Otsu's threshold (DIPY); mrtrix: "
                              "MRtrix3 3.0's dwi2mask (every shell's mean image at its optimal threshold, median, "
                              "largest component, holes filled, peninsulas cleaned)")
    clean_scale: int = option(2, minimum=0, maximum=10,
                              help="mrtrix: largest scale of the peninsula cleaning (dwi2mask -clean_scale; 0: none)")
    median_radius: int = option(4, help="radius of the median filter in voxels", minimum=1, maximum=20)
    numpass: int = option(4, help="passes of the median filter", minimum=1, maximum=20)
    dilate: int = option(-1, help="in-plane dilation steps at the end (-1: 1 on slabs thinner than the median window, "
                                  "0 on whole brains)", minimum=-1, maximum=10)


# a brain covers about a quarter to two fifths of a DWI's field of view (0.26-0.38 in ../shared/data/bids_real);
# outside these bounds the mask, or the data, deserve a look
PLAUSIBLE_FOV_FRACTION = (0.05, 0.85)


def run_mask(files, outputs, options: MaskOptions, context):
    """Median-Otsu brain mask of the mean b=0 image (Garyfallidis et al. 2014), or MRtrix3's dwi2mask."""
    from dwiflow.core.mask import default_dilation, median_otsu_mask, median_window, mrtrix3_dwi2mask

    run = load_dwi(files["dwi"], files["bval"], files["bvec"])
    if options.method == "mrtrix":
        mask = mrtrix3_dwi2mask(run.data, run.gtab, clean_scale=options.clean_scale)
        described = {"Method": "MRtrix3 dwi2mask", "CleanScale": options.clean_scale}
    else:
        window = median_window(run.data.shape[:3], options.median_radius)
        dilation = default_dilation(run.data.shape[:3], window) if options.dilate < 0 else options.dilate
        mask = median_otsu_mask(run.data, run.gtab, median_radius=options.median_radius, numpass=options.numpass,
                                dilate=dilation)
        described = {"Method": "median-Otsu", "MedianWindow": list(window),
                     "HolesFilled": "3-D and within every slice", "InPlaneDilation": dilation}
    fraction = float(mask.mean())
    warnings = []
    if not PLAUSIBLE_FOV_FRACTION[0] <= fraction <= PLAUSIBLE_FOV_FRACTION[1]:
        warnings.append(f"the automatic brain mask covers {100 * fraction:.0f}% of the field of view (a brain covers "
                        f"about 25-40%): check it, or give a mask with --mask-dir")
    with atomic_outputs() as out:
        path = out.nifti(outputs["mask"], mask.astype(np.uint8), run.affine,
                         sidecar("mask", **provenance(files["dwi"], files["bval"], files["bvec"]),
                                 VoxelCount=int(mask.sum()), FieldOfViewFraction=round(fraction, 4), **described,
                                 **({"Warnings": warnings} if warnings else {})),
                         dtype=np.uint8)
    return {"mask": path}


def check_mask_data(data, options) -> None:
    if data.n_b0 == 0 and options.method != "mrtrix":
        raise DwiflowInputError("the brain mask is computed from the b=0 volumes and this run has none; give a mask "
                                "(--mask-dir)")


STAGES = (
    Stage(
        name="mask", order=10, title="Brain mask", summary="brain mask from the b=0 volumes",
        methods=lambda o: ("A brain mask was computed as MRtrix3's dwi2mask (every shell's mean image at its optimal "
                           f"threshold, median filtering, largest component, holes filled, clean scale "
                           f"{o.clean_scale})" if o.method == "mrtrix" else
                           f"A brain mask was computed from the mean b=0 image by median filtering (radius "
                           f"{o.median_radius} voxels, {o.numpass} passes) and Otsu's threshold, keeping the largest "
                           "connected component and filling its holes, as DIPY's median_otsu"),
        references=lambda o: ("dhollander2016", "mrtrix3") if o.method == "mrtrix" else ("dipy", "otsu"),
        description="Median-Otsu brain mask of the mean b=0 image: median filter, Otsu threshold, largest "
                    "component, holes filled in 3-D and within slices, one in-plane dilation on thin slabs "
                    "(Garyfallidis et al. 2014); or, with --method mrtrix, MRtrix3 3.0's dwi2mask. In a run, a mask "
                    "given with --mask-dir replaces it.",
        options=MaskOptions, run=run_mask, inputs=DWI_INPUTS,
        outputs=(Output("mask", "the brain mask", cli="positional", metavar="OUT"),),
        provides={"mask": "mask"}, always=True, check_data=check_mask_data, threads=True,
        compiled=lambda o: o.method == "median-otsu",
    ),
)
