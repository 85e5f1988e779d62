"""Command ``shells``: each shell's b-value and volume count."""

from __future__ import annotations

from dataclasses import dataclass

from dwiflow.core.defaults import B0_THRESHOLD
from dwiflow.tasks.io import read_bvals
from dwiflow.tasks.options import StageOptions, option
from dwiflow.tasks.registry import Input, Stage


@dataclass(frozen=True)
class ShellsOptions(StageOptions):
    b0_threshold: float = option(B0_THRESHOLD, help="largest b counted as b=0", minimum=0, units="s/mm²")


def shells_of(bval, b0_threshold: float = B0_THRESHOLD) -> list[tuple[float, int]]:
    """Shells of a ``.bval`` file as (mean b-value, volume count), b=0 first."""
    from dwiflow.core.gradients import cluster_shells

    return [(s.bvalue, s.count) for s in cluster_shells(read_bvals(bval), b0_threshold)]


def run_shells(files, outputs, options: ShellsOptions, context):
    """Print each shell (MRtrix3 ``mrinfo -shell_bvalues -shell_sizes`` as a table)."""
    for bvalue, count in shells_of(files["bval"], options.b0_threshold):
        label = "b=0" if bvalue <= options.b0_threshold else f"b={bvalue:.0f}"
        print(f"{label:>8s}  {count:4d} volumes  (mean b {bvalue:g})")
    return {}


STAGES = (
    Stage(name="shells", order=2010, title="Shells", summary="list the shells of a .bval file",
          description="Print each shell's b-value and volume count.", options=ShellsOptions, run=run_shells,
          inputs=(Input("bval", "BVAL", "b-values (BIDS/FSL .bval)"),), pipeline=False),
)
