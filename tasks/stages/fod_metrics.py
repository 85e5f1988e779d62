"""Stage ``fod_metrics``: total AFD, peak amplitudes, NuFO and GFA from an FOD and its peaks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import load_image
from dwiflow.tasks.options import StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import fod_model_of, load_sh_image, provenance, write_maps


@dataclass(frozen=True)
class FodMetricsOptions(StageOptions):
    """How the maps are named on the command line (in a run they carry the FOD's model)."""

    model: str | None = option(None, spec=False,
                               help="model label in the output names (default: the FOD file's model entity, or csd)")

    def check(self) -> None:
        from dwiflow.tasks.options import OptionError

        if self.model is not None and not self.model.isalnum():
            raise OptionError(f"{{model}}: a BIDS label is letters and digits only, got {self.model!r}", "model")


def run_fod_metrics(files, outputs, options: FodMetricsOptions, context):
    """Total AFD (Raffelt 2012), per-peak amplitude, NuFO and GFA (Tuch 2004), one NIfTI + sidecar each."""
    from dwiflow.core.peaks import fod_metrics

    fod, peaks = files["fod"], files["peaks"]
    sh, affine, _ = load_sh_image(fod)
    pk = load_image(peaks, "peaks")
    if len(pk.shape) != 4 or pk.shape[3] % 3:
        raise DwiflowInputError(f"peaks {peaks} must be 4D with 3 volumes per peak, got shape {pk.shape}")
    if tuple(pk.shape[:3]) != sh.shape[:3]:
        raise DwiflowInputError(f"peaks {peaks} has spatial shape {pk.shape[:3]} but the FOD has {sh.shape[:3]}")
    maps = fod_metrics(sh, np.asarray(pk.dataobj, dtype=float))
    return write_maps(STAGES[0], outputs, maps.__getitem__, affine, None,
                      {**fod_model_of(fod), **provenance(fod, peaks)})


STAGES = (
    Stage(
        name="fod_metrics", order=90, title="FOD metrics", summary="total AFD, peak amplitudes, NuFO and GFA",
        methods=lambda o: ("Total apparent fibre density, peak amplitudes, the number of fibre orientations "
                           "(NuFO) and the generalised fractional anisotropy of the FOD were computed"),
        references=("raffelt2012", "dellacqua2013", "tuch2004"),
        description="Scalar maps from an FOD and its peaks, one NIfTI + sidecar each, into OUT_DIR.",
        options=FodMetricsOptions, run=run_fod_metrics,
        inputs=(Input("fod", "FOD", "FOD (SH image)"), Input("peaks", "PEAKS", "its peaks (dwirecon peaks)")),
        outputs=(Output("afd_total", "total apparent fibre density"),
                 Output("peak_amplitude", "amplitude of each peak"),
                 Output("nufo", "number of fibre orientations"), Output("gfa", "generalised fractional anisotropy")),
    ),
)
