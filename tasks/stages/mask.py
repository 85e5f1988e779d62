"""Stage ``mask``: a brain mask from the b=0 volumes (median-Otsu)."""

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
    """Median-Otsu parameters (DIPY's ``median_otsu`` names and defaults)."""

    median_radius: int = option(4, help="radius of the median filter in voxels", minimum=1, maximum=20)
    numpass: int = option(4, help="passes of the median filter", minimum=1, maximum=20)


def run_mask(files, outputs, options: MaskOptions, context):
    """Median-Otsu brain mask of the mean b=0 image (Garyfallidis et al. 2014)."""
    from dwiflow.core.mask import median_otsu_mask

    run = load_dwi(files["dwi"], files["bval"], files["bvec"])
    mask = median_otsu_mask(run.data, run.gtab, median_radius=options.median_radius, numpass=options.numpass)
    with atomic_outputs() as out:
        path = out.nifti(outputs["mask"], mask.astype(np.uint8), run.affine,
                         sidecar("mask", **provenance(files["dwi"], files["bval"], files["bvec"]),
                                 VoxelCount=int(mask.sum())),
                         dtype=np.uint8)
    return {"mask": path}


def check_mask_data(data, options) -> None:
    if data.n_b0 == 0:
        raise DwiflowInputError("the brain mask is computed from the b=0 volumes and this run has none; give a mask "
                                "(--mask-dir)")


STAGES = (
    Stage(
        name="mask", order=10, title="Brain mask", summary="brain mask from the b=0 volumes",
        description="Median-Otsu brain mask of the mean b=0 image: median filter, Otsu threshold, largest "
                    "component, holes filled (Garyfallidis et al. 2014). In a run, a mask given with --mask-dir "
                    "replaces it.",
        options=MaskOptions, run=run_mask, inputs=DWI_INPUTS,
        outputs=(Output("mask", "the brain mask", cli="positional", metavar="OUT"),),
        provides={"mask": "mask"}, always=True, check_data=check_mask_data,
    ),
)
