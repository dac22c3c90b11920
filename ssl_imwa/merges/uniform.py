"""`imwa.merge=uniform`: IMWA's merge, the plain mean of the K students and, separately, of the K teachers."""
from __future__ import annotations

from typing import Any

from ssl_imwa.distributed import Communicator, average_across
from ssl_imwa.merge import MergeResult, MergeStrategy, register_merge


def uniform_merge(replica_states: list[dict[str, Any]], total: int | None = None,
                  comm: Communicator | None = None) -> MergeResult:
    """The mean of students and, separately, of EMA teachers over all `total` replicas (K across all
    processes; `replica_states` are this process's, all of them when there is one process)."""
    total = total or len(replica_states)
    return MergeResult(
        model=average_across([state["model"] for state in replica_states], total, comm, "student merge"),
        teacher=average_across([state["teacher"] for state in replica_states], total, comm, "teacher merge"),
        report={"strategy": "uniform", "coefficients": [1.0 / total] * total})


@register_merge("uniform")
class UniformMerge(MergeStrategy):
    """Every replica weighs 1/K (IMWA, MWA); no options, no data."""

    def __call__(self, states: list[dict[str, Any]], indices: list[int], start: dict[str, Any], episode: int
                 ) -> MergeResult:
        return uniform_merge(states, self.context.replicas, self.context.comm)
