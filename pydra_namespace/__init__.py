"""dwiflow's stages as Pydra 1.0 tasks under the namespace pydra-tasks packages use: ``from pydra.tasks.dwiflow
import Csd, Tensor, Peaks``. The same classes as :mod:`dwiflow.tasks.pydra_tasks` (one per registered stage, named
after it: ``Mask``, ``Tensor``, ``ResponseFa`` … ``MsmtCsd``, ``Mtnormalise``, ``FodMetrics``), plus the derivative
staging and figures tasks the BIDS App adds."""

from dwiflow.tasks.pydra_tasks import STAGE_TASKS, Figures, StageDerivatives, code_version

_STAGES = {task.__qualname__: task for task in STAGE_TASKS.values()}
globals().update(_STAGES)

__all__ = sorted([*_STAGES, "Figures", "StageDerivatives", "code_version"])
