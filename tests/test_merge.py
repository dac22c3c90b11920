"""Merge arithmetic on hand-made state dicts."""
import torch

from ssl_imwa.algorithm import mean_of_states
from ssl_imwa.merge import average_tensors, merge_optimizer_states, uniform_merge


def _state(scale: float, batches: int) -> dict:
    return {
        "model": {"w": torch.tensor([1.0, 2.0]) * scale, "bn.num_batches_tracked": torch.tensor(batches)},
        "teacher": {"w": torch.tensor([10.0, 20.0]) * scale, "bn.num_batches_tracked": torch.tensor(batches)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([scale])}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "algorithm": {"estimate": torch.tensor([scale, 1 - scale]), "epoch": 3},
    }


def test_floats_averaged_and_integers_copied() -> None:
    merged = average_tensors([{"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(7)},
                              {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}])
    assert torch.equal(merged["w"], torch.tensor([2.0, 4.0]))
    assert merged["n"].item() == 7 and merged["n"].dtype == torch.int64


def test_students_and_teachers_merged_separately() -> None:
    result = uniform_merge([_state(1.0, 5), _state(0.5, 6)], "average", mean_of_states)
    assert torch.allclose(result.model["w"], torch.tensor([0.75, 1.5]))
    assert torch.allclose(result.teacher["w"], torch.tensor([7.5, 15.0]))
    assert result.model["bn.num_batches_tracked"].item() == 5
    assert torch.allclose(result.algorithm["estimate"], torch.tensor([0.75, 0.25]))
    assert result.algorithm["epoch"] == 3
    assert result.report["strategy"] == "uniform" and result.report["coefficients"] == [0.5, 0.5]


def test_momentum_policies() -> None:
    states = [_state(1.0, 0)["optimizer"], _state(0.5, 0)["optimizer"]]
    averaged = merge_optimizer_states(states, "average")
    assert torch.allclose(averaged["state"][0]["momentum_buffer"], torch.tensor([0.75]))
    assert merge_optimizer_states(states, "keep") is None
    assert merge_optimizer_states(states, "reset")["state"] == {}


def test_merging_one_replica_is_identity() -> None:
    state = _state(0.3, 2)
    result = uniform_merge([state], "average", mean_of_states)
    assert torch.equal(result.model["w"], state["model"]["w"])
    assert torch.equal(result.optimizer["state"][0]["momentum_buffer"], state["optimizer"]["state"][0]["momentum_buffer"])


FIRST_REPLICA_MERGE = '''
from ssl_imwa.merge import MergeResult, MergeStrategy, merge_optimizers_and_algorithms, register_merge


@register_merge("first_replica")
class FirstReplica(MergeStrategy):
    """Every replica restarts from replica 0 (a degenerate 'soup' of one ingredient)."""

    def __call__(self, states, indices, start, episode):
        context = self.context
        optimizer, algorithm = merge_optimizers_and_algorithms(
            states, indices, "keep", context.merge_algorithm_states, context.cfg.imwa.k, context.comm)
        first = states[indices.index(0)]
        return MergeResult(first["model"], first["teacher"], optimizer, algorithm,
                           {"strategy": "first_replica", "seconds": 0.0})
'''


def test_a_new_merge_strategy_is_one_module(tmp_path, monkeypatch) -> None:
    """Registered from a plugin module and chosen by imwa.merge, without touching the engine."""
    from tests.utils import read_metrics, read_results, train_run

    (tmp_path / "first_replica_merge.py").write_text(FIRST_REPLICA_MERGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = train_run(tmp_path, [
        "experiment=quickstart", "train.iterations=10", "train.eval_every=10", "train.batch_size=16", "train.mu=2",
        "train.num_threads=1", "imwa.k=2", "plugins=[first_replica_merge]", "imwa.merge=first_replica"])
    assert read_results(run_dir)["imwa"]["per_episode"][0]["strategy"] == "first_replica"
    evaluations = {(row["source"], row["replica"]): row["per_class"] for row in read_metrics(run_dir)}
    assert evaluations[("merged", None)] == evaluations[("replica", 0)] != evaluations[("replica", 1)]
