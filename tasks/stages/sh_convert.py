"""Command ``sh-convert``: an SH image from one basis into the other (MRtrix3 ↔ DIPY's descoteaux07)."""

from __future__ import annotations

from dataclasses import dataclass

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import SH_BASIS_LABELS, atomic_outputs, load_image, read_sidecar, sh_basis_of
from dwiflow.tasks.options import StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import provenance


@dataclass(frozen=True)
class ShConvertOptions(StageOptions):
    to: str = option("descoteaux07", help="basis to write: DIPY's descoteaux07 (non-legacy) or MRtrix3's",
                     choices=tuple(SH_BASIS_LABELS))
    source_basis: str | None = option(None, choices=tuple(SH_BASIS_LABELS),
                                      help="basis of the input (default: its sidecar's SphericalHarmonicBasis, else "
                                           "mrtrix3); given, it must agree with the sidecar", metavar="BASIS")


def run_sh_convert(files, outputs, options: ShConvertOptions, context):
    """Re-express the coefficients: a signed permutation within each degree (exact both ways); the sidecar is kept
    with its SphericalHarmonicBasis updated."""
    import numpy as np

    from dwiflow.core.sh import convert_sh_basis, lmax_from_n_coefficients

    path = files["sh"]
    img = load_image(path, "SH image")
    upstream = read_sidecar(path) or {}
    declared = sh_basis_of(upstream, path) if "SphericalHarmonicBasis" in (upstream.get("OrientationEncoding")
                                                                           or {}) else None
    source = options.source_basis or declared or "mrtrix3"
    if declared is not None and options.source_basis is not None and declared != options.source_basis:
        raise DwiflowInputError(f"{options.source_basis} contradicts the sidecar of {path}, which "
                                f"declares {SH_BASIS_LABELS[declared]}", parameters=("source_basis",))
    if len(img.shape) != 4:
        raise DwiflowInputError(f"SH image {path} must be 4D (x, y, z, coefficients), got shape {img.shape}")
    lmax = lmax_from_n_coefficients(img.shape[3])
    data = np.asarray(img.dataobj, dtype=np.float32)
    converted = convert_sh_basis(data, source, options.to)
    encoding = {**(upstream.get("OrientationEncoding") or {}), "Type": "sh", "SphericalHarmonicDegree": lmax,
                "SphericalHarmonicBasis": SH_BASIS_LABELS[options.to]}
    content = {**upstream, "OrientationEncoding": encoding, **provenance(path),
               "Description": (upstream.get("Description", "") + f" (converted from the {source} SH basis to "
                               f"{options.to})").strip()}
    with atomic_outputs() as out:  # the basis is already the requested one: written as it is
        written = out.nifti(outputs["out"], converted, img.affine, content)
    return {"out": written}


STAGES = (
    Stage(name="sh_convert", order=2020, title="SH basis conversion",
          summary="convert an SH image between the MRtrix3 and descoteaux07 bases",
          description="Re-expresses SH coefficients in the other basis (MRtrix3's, or DIPY's non-legacy descoteaux07; "
                      "the same functions, each coefficient moved within its degree and its sign changed as needed), "
                      "reading the source basis from the sidecar's SphericalHarmonicBasis.",
          options=ShConvertOptions, run=run_sh_convert,
          inputs=(Input("sh", "IN_SH", "SH image (e.g. an FOD) with its JSON sidecar"),),
          outputs=(Output("out", "the converted SH image", cli="positional", metavar="OUT_SH"),),
          pipeline=False),
)
