"""Merge arithmetic on hand-made state dicts, and merge strategies as plugins."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_imwa.algorithm import mean_of_states
from ssl_imwa.merge import (
    average_tensors,
    merge_model_momentum,
    merge_optimizer_states,
    merge_optimizers_and_algorithms,
)
from ssl_imwa.merges.uniform import uniform_merge

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


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
    states = [_state(1.0, 5), _state(0.5, 6)]
    result = uniform_merge(states)
    _, algorithm = merge_optimizers_and_algorithms(states, [0, 1], "average", mean_of_states, 2, None)
    assert torch.allclose(result.model["w"], torch.tensor([0.75, 1.5]))
    assert torch.allclose(result.teacher["w"], torch.tensor([7.5, 15.0]))
    assert result.model["bn.num_batches_tracked"].item() == 5
    assert torch.allclose(algorithm["estimate"], torch.tensor([0.75, 0.25]))
    assert algorithm["epoch"] == 3
    assert result.report["strategy"] == "uniform" and result.report["coefficients"] == [0.5, 0.5]


def test_momentum_policies() -> None:
    states = [_state(1.0, 0)["optimizer"], _state(0.5, 0)["optimizer"]]
    averaged = merge_optimizer_states(states, "average")
    assert torch.allclose(averaged["state"][0]["momentum_buffer"], torch.tensor([0.75]))
    assert merge_optimizer_states(states, "keep") is None
    assert merge_optimizer_states(states, "reset")["state"] == {}


def test_merging_one_replica_is_identity() -> None:
    state = _state(0.3, 2)
    result = uniform_merge([state])
    optimizer, _ = merge_optimizers_and_algorithms([state], [0], "average", mean_of_states, 1, None)
    assert torch.equal(result.model["w"], state["model"]["w"])
    assert torch.equal(optimizer["state"][0]["momentum_buffer"], state["optimizer"]["state"][0]["momentum_buffer"])


@pytest.fixture()
def pick_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """docs/extending.md's merge strategy, as a module outside the repository."""
    code = re.search(r"```python\n(# my_merges/pick.py\n.*?)```", DOC.read_text(), re.DOTALL).group(1)
    (tmp_path / "my_merges").mkdir()
    (tmp_path / "my_merges" / "__init__.py").write_text("")
    (tmp_path / "my_merges" / "pick.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_merges.pick"
    for name in [name for name in sys.modules if name.startswith("my_merges")]:
        del sys.modules[name]


@pytest.mark.slow
def test_a_plugin_strategy_s_options_are_typed_and_checked_by_name(pick_plugin: str) -> None:
    from omegaconf.errors import ValidationError

    from ssl_imwa.config import validate
    from tests.utils import compose_config

    base = ["experiment=quickstart", "imwa.k=2", f"plugins=[{pick_plugin}]", "imwa.merge=pick"]
    assert validate(compose_config([*base, "imwa.pick.replica=1"])).imwa.pick.replica == 1
    assert validate(compose_config(base)).imwa.pick.replica == 0  # the dataclass's default
    # a run that does not name the plugin does not see its options, though this process loaded it
    assert "pick" not in validate(compose_config(["experiment=quickstart"])).imwa
    with pytest.raises(ValueError, match=r"^imwa\.pick\.replica=2: expected an integer in \[0, 1\]"):
        validate(compose_config([*base, "imwa.pick.replica=2"]))
    with pytest.raises(ValidationError) as error:
        validate(compose_config([*base, "imwa.pick.replica=first"]))
    assert error.value.full_key == "imwa.pick.replica"
    with pytest.raises(ValueError, match=r"^unknown key imwa\.pik; did you mean imwa\.pick\?"):
        validate(compose_config([*base, "imwa.pik.replica=1"]))


@pytest.mark.slow
def test_a_plugin_strategy_from_outside_the_repository_merges_a_run(tmp_path: Path, pick_plugin: str) -> None:
    """Registered from a module in tmp_path and chosen by imwa.merge, without touching the engine."""
    from tests.utils import read_metrics, read_results, train_run

    run_dir = train_run(tmp_path, [
        "experiment=quickstart", "train.iterations=10", "train.eval_every=10", "train.batch_size=16", "train.mu=2",
        "train.num_threads=1", "imwa.k=2", f"plugins=[{pick_plugin}]", "imwa.merge=pick", "imwa.pick.replica=1"])
    assert read_results(run_dir)["imwa"]["per_episode"][0]["strategy"] == "pick"
    evaluations = {(row["source"], row["replica"]): row["per_class"] for row in read_metrics(run_dir)}
    assert evaluations[("merged", None)] == evaluations[("replica", 1)] != evaluations[("replica", 0)]


@pytest.mark.slow
def test_the_engine_imports_no_merge_strategy_until_one_is_looked_up() -> None:
    """The built-in strategies are plugins: the engine names none, the registry's scan finds them."""
    code = ("import sys\n"
            "import ssl_imwa.config, ssl_imwa.merge, ssl_imwa.imwa, ssl_imwa.builders, ssl_imwa.run\n"
            "assert not [name for name in sys.modules if name.startswith('ssl_imwa.merges')], sys.modules\n"
            "from ssl_imwa.merge import list_merges\n"
            "assert {'uniform', 'twa'} <= set(list_merges())\n"
            "assert 'ssl_imwa.merges.twa' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=DOC.parents[1])


@pytest.mark.parametrize("policy, expected", [("keep", [[2.0, 4.0], [4.0, 8.0]]), ("reset", [[0.0, 0.0], [0.0, 0.0]]),
                                              ("average", [[3.0, 6.0], [3.0, 6.0]])])
def test_momentum_an_algorithm_keeps_in_the_model_follows_imwa_momentum(policy: str, expected: list) -> None:
    models = [{"weight": torch.tensor([1.0, 2.0]), "momentum": torch.tensor([2.0, 4.0])},
              {"weight": torch.tensor([3.0, 4.0]), "momentum": torch.tensor([4.0, 8.0])}]
    merged = merge_model_momentum(models, ["momentum"], policy, total=2)
    assert [state["momentum"].tolist() for state in merged] == expected
    assert all(state.keys() == {"momentum"} for state in merged)   # the weights are the strategy's
    merged[0]["momentum"].add_(1)   # copies: the replicas' own tensors stay as they were
    assert models[0]["momentum"].tolist() == [2.0, 4.0]
    assert merge_model_momentum(models, [], policy, total=2) == [{}, {}]
