"""Stage ``mtnormalise``: multi-tissue log-domain intensity normalisation (MRtrix3 ``mtnormalise``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dwiflow.bids_specs.outputs import output_spec, sidecar
from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import atomic_outputs, load_image, load_mask, read_sidecar
from dwiflow.tasks.options import OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import issued_warnings, provenance

TISSUES = (("fod", "wm", "WM FOD"), ("gm", "gm_norm", "GM"), ("csf", "csf_norm", "CSF"))


@dataclass(frozen=True)
class MtNormaliseOptions(StageOptions):
    """MRtrix3 ``mtnormalise`` parameters (same names and defaults)."""

    order: int = option(3, help="order of the polynomial (in scanner mm) of the log normalisation field",
                        minimum=0, maximum=3)
    niter: list[int] = option([15, 7], help="main iterations, and balance/outlier iterations inside each",
                              minimum=1, length=(1, 2), metavar="MAIN[,BALANCE]")
    reference: float = option(0.28209479177, help="value the balanced tissue sum is normalised to (the l=0 term of "
                                                  "a unit-integral ODF)", exclusive_minimum=True, minimum=0)
    balanced: bool = option(False, help="also scale each tissue by its balance factor (changes AFD; see MRtrix3)")


def run_mtnormalise(files, outputs, options: MtNormaliseOptions, context):
    """Normalise the tissue images by one smooth field; write them, and on request the field, inliers, factors."""
    from dwiflow.core.mtnormalise import mtnormalise

    given = [(kind, out, label) for kind, out, label in TISSUES if files.get(kind)]
    for kind, out, label in TISSUES:
        if files.get(kind) and out not in outputs:
            raise OptionError(f"the {label} image is given but not where to write it normalised "
                              f"(--{out.replace('_', '-')} FILE)")
        if out in outputs and not files.get(kind):
            raise OptionError(f"--{out.replace('_', '-')} is given but no {label} image (--{kind} FILE)")
    images = [load_image(files[kind], label) for kind, _, label in given]
    reference = images[0]
    for (kind, _, label), img in zip(given, images):
        if tuple(img.shape[:3]) != tuple(reference.shape[:3]) or not np.allclose(img.affine, reference.affine,
                                                                                  atol=1e-3):
            raise DwiflowInputError(f"{label} image {files[kind]} is not on the grid of {files[given[0][0]]}")
    mask = load_mask(files["mask"], reference.shape[:3], reference.affine)
    niter = list(options.niter) + [7] * (2 - len(options.niter))
    result = mtnormalise([np.asarray(img.dataobj, dtype=np.float32) for img in images], mask, reference.affine,
                         order=options.order, niter=niter[0], balance_iter=niter[1], reference=options.reference,
                         balanced=options.balanced)
    factors = {label: float(f) for (_, _, label), f in zip(given, result.balance_factors)}
    params = {"Order": options.order, "Iterations": niter, "Reference": options.reference,
              "Balanced": options.balanced}
    described = provenance(*(files[kind] for kind, _, _ in given), files["mask"])  # and the warnings, if any
    described |= issued_warnings([] if result.determined_order >= options.order else [
        f"the mask's voxels do not determine an order-{options.order} field (e.g. a slab of few slices): part of it "
        "depends on rounding (in MRtrix3's mtnormalise too); "
        + (f"order {result.determined_order} or less is determined" if result.determined_order >= 0
           else "no order is determined")])
    written = {}
    with atomic_outputs() as out:
        for (kind, name, label), image, img in zip(given, result.normalised, images):
            upstream = read_sidecar(files[kind]) or {}
            extra = {k: upstream[k] for k in ("OrientationEncoding", "ResponseFunction") if k in upstream}
            content = sidecar(f"mtnormalise_{name}", params, **extra, **described, LognormScale=result.lognorm_scale,
                              BalanceFactor=factors[label], **({"LognormBalance": factors[label]}
                                                                if options.balanced else {}))
            written[name] = out.nifti(outputs[name], image, img.affine, content)
        if "check_norm" in outputs:
            written["check_norm"] = out.nifti(outputs["check_norm"], result.field, reference.affine,
                                              sidecar("mtnormalise_check_norm", params, **described))
        if "check_mask" in outputs:
            written["check_mask"] = out.nifti(outputs["check_mask"], result.inliers.astype(np.uint8),
                                              reference.affine, sidecar("mtnormalise_check_mask", params, **described),
                                              dtype=np.uint8)
        if "fractions" in outputs or "fractions_rgb" in outputs:
            from dwiflow.core.msmt_csd import tissue_fractions, tissue_rgb

            names = [{"fod": "wm"}.get(kind, kind) for kind, _, _ in given]
            l0 = [image[..., 0] if image.ndim == 4 else image for image in result.normalised]
            fractions = np.where(mask[..., None], tissue_fractions(l0), 0.0)
            order = {"TissueOrder": [label for _, _, label in given]}
            if "fractions" in outputs:
                written["fractions"] = out.nifti(outputs["fractions"], fractions.astype(np.float32), reference.affine,
                                                 sidecar("mtnormalise_fractions", params, **order, **described))
            if "fractions_rgb" in outputs:
                written["fractions_rgb"] = out.nifti(outputs["fractions_rgb"], tissue_rgb(fractions, names),
                                                     reference.affine, sidecar("mtnormalise_fractions_rgb", params,
                                                                               **described), dtype=np.uint8)
        if "check_factors" in outputs:
            written["check_factors"] = out.text(outputs["check_factors"],
                                                " ".join(f"{f:.6g}" for f in result.balance_factors) + "\n")
    return written


def compartment_slots(images: list[Path], free: list[int]) -> list[int]:
    """The tissues (GM = 1, CSF = 2) of the compartments that follow the WM FOD pair on the command line: in order,
    except that a single one is CSF when its sidecar says so (dwiflow's msmt-csd and ss3t-csd write one; MRtrix3's
    two-tissue recipe is WM + CSF). The normalisation is the same either way; the tissue-fraction volumes differ."""
    if len(images) == 1 and free == [1, 2]:
        csf = {output_spec(key)["Description"] for key in ("msmt_csd_csf", "ss3t_csd_csf", "mtnormalise_csf_norm")}
        if (read_sidecar(images[0]) or {}).get("Description") in csf:
            return [2]
    return free[:len(images)]


STAGES = (
    Stage(
        name="mtnormalise", order=45, title="Multi-tissue normalisation (Dhollander 2021)",
        methods=lambda o: ("The tissue compartments were corrected together for intensity inhomogeneity and "
                           f"global intensity differences in the log domain (polynomial field of order {o.order}), as "
                           "MRtrix3's mtnormalise"),
        references=("raffelt2017", "dhollander2021", "mrtrix3"),
        summary="multi-tissue log-domain intensity normalisation (MRtrix3 mtnormalise)",
        description="Drives the balanced sum of the tissues' l=0 terms to a reference value with a smooth "
                    "polynomial field in the log domain, rejecting outliers, as MRtrix3 3.0's mtnormalise; divides "
                    "every tissue image by the field. The tissues as MRtrix3 takes them (IN_WM OUT_WM IN_GM OUT_GM "
                    "IN_CSF OUT_CSF; two pairs: WM and GM, or WM and CSF when the second's sidecar says CSF) or with "
                    "the options below.",
        options=MtNormaliseOptions, run=run_mtnormalise,
        inputs=(Input("fod", "IN_WM", "the WM FOD (SH, e.g. from msmt-csd)"),
                Input("gm", "FILE", "the GM compartment", required=False, flag=True),
                Input("csf", "FILE", "the CSF compartment", required=False, flag=True),
                Input("mask", "MASK", "brain mask (required, as MRtrix3)", flag=True)),
        outputs=(Output("wm", "the normalised WM FOD", cli="positional", metavar="OUT_WM"),
                 Output("gm_norm", "the normalised GM compartment", cli="flag"),
                 Output("csf_norm", "the normalised CSF compartment", cli="flag"),
                 Output("fractions", "tissue fractions: each tissue's normalised l=0 term over their sum (one volume "
                        "per tissue, in the order WM, GM, CSF)", cli="flag"),
                 Output("fractions_rgb", "RGB rendering of the tissue fractions (CSF red, GM green, WM blue; uint8)",
                        cli="flag", metavar="RGB"),
                 Output("check_norm", "the normalisation field", cli="flag", metavar="FIELD"),
                 Output("check_mask", "the voxels the final fit used (outliers excluded)", cli="flag",
                        metavar="MASK"),
                 Output("check_factors", "the tissue balance factors (text)", cli="flag", metavar="FILE")),
        provides={"fod": "wm"}, fod_priority=36,
        cli_pairs=(("fod", "wm"), ("gm", "gm_norm"), ("csf", "csf_norm")), cli_pair_slots=compartment_slots,
    ),
)
