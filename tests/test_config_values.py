"""Out-of-range values fail before any data is read, with a message naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from ssl_imwa.config import validate
from ssl_imwa.data import build_data
from ssl_imwa.validation import expect_range
from tests.utils import CONFIG_DIR, compose_config, train_run

BAD_VALUES = [
    (["algorithm.threshold=1.5"], "algorithm.threshold=1.5"),
    (["algorithm.threshold=-0.5"], "algorithm.threshold=-0.5"),
    (["algorithm.lambda_u=-1"], "algorithm.lambda_u=-1"),
    (["algorithm.temperature=0"], "algorithm.temperature=0"),
    (["algorithm.ema.decay=1.0"], "algorithm.ema.decay=1.0"),
    (["algorithm.weak_pass=half"], "algorithm.weak_pass='half'"),
    (["algorithm=daso", "algorithm.queue_size=0"], "algorithm.queue_size=0"),
    (["algorithm=daso", "algorithm.proto_temperature=-0.05"], "algorithm.proto_temperature=-0.05"),
    (["algorithm=daso", "algorithm.interp_alpha=1.5"], "algorithm.interp_alpha=1.5"),
    (["algorithm=acr", "algorithm.estimate_momentum=2"], "algorithm.estimate_momentum=2"),
    (["algorithm=acr", "algorithm.tau_max=-1"], "algorithm.tau_max=-1"),
    (["algorithm=acr", "algorithm.tau2=nan"], "algorithm.tau2=nan"),
    (["train.momentum=1.5"], "train.momentum=1.5"),
    (["train.weight_decay=-1"], "train.weight_decay=-1"),
    (["train.lr=inf"], "train.lr=inf"),
    (["train.lr=0"], "train.lr=0"),
    (["train.eval_batch_size=0"], "train.eval_batch_size=0"),
    (["train.log_every=0"], "train.log_every=0"),
    (["train.num_threads=-1"], "train.num_threads=-1"),
    (["train.stop_at=900"], "train.stop_at=900"),
    (["model.bn_momentum=2"], "model.bn_momentum=2"),
    (["imwa.timeout_s=0"], "imwa.timeout_s=0"),
    (["imwa.twa.steps=0"], "imwa.twa.steps=0"),
    (["imwa.keep_merges=1"], "imwa.keep_merges=1"),
    # the dataset's own checks run in the same pass, before any file is read
    (["dataset.protocol=bogus"], "dataset.protocol='bogus'"),
    (["dataset.n_max=0"], "dataset.n_max=0"),
    (["dataset.image_size=2"], "dataset.image_size=2"),
    (["dataset.unlabeled=unknown"], "dataset.unlabeled='unknown'"),
]


@pytest.mark.parametrize("overrides, named", BAD_VALUES, ids=[" ".join(case[0]) for case in BAD_VALUES])
def test_an_out_of_range_value_is_refused_by_name(overrides: list[str], named: str) -> None:
    with pytest.raises(ValueError) as error:
        validate(compose_config(["experiment=quickstart", *overrides]))
    assert str(error.value).startswith(named), str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_the_presets_and_defaults_are_valid() -> None:
    for overrides in ([], ["experiment=quickstart", "algorithm=daso"], ["experiment=quickstart", "algorithm=acr"],
                      ["experiment=cifar10_lt"], ["experiment=stl10_lt"]):
        validate(compose_config(overrides))


def test_an_image_folder_without_a_root_names_the_key() -> None:
    """A required root is named as missing, not filled in by the schema's default (./data)."""
    cfg = validate(compose_config(["dataset=imagefolder"]))
    with pytest.raises(ValueError, match=r"^dataset.root is not set: dataset.name=imagefolder"):
        build_data(cfg.dataset)


@pytest.mark.parametrize("value, low, high, low_open, high_open, accepted", [
    (0.0, 0, 1, False, False, True), (0.0, 0, 1, True, False, False), (1.0, 0, 1, False, True, False),
    (1.0, 0, 1, False, False, True), (float("inf"), 0, None, False, False, False),
    (float("nan"), None, None, False, False, False), (-5.0, None, 0, False, False, True),
])
def test_expect_range_bounds(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool,
                             accepted: bool) -> None:
    if accepted:
        expect_range("key", value, low, high, low_open=low_open, high_open=high_open)
    else:
        with pytest.raises(ValueError, match="^key="):
            expect_range("key", value, low, high, low_open=low_open, high_open=high_open)


@pytest.mark.slow
def test_a_semi_supervised_algorithm_without_unlabeled_images_names_train_mu(tmp_path: Path) -> None:
    """mu=0 is refused before training: it would train until 'loss is nan' (a mean over zero unlabeled images)."""
    with pytest.raises(ValueError, match=r"^train.mu=0: fixmatch learns from unlabeled images"):
        train_run(tmp_path, ["experiment=quickstart", "train.mu=0", "train.iterations=4"])
    supervised = train_run(tmp_path, ["experiment=quickstart", "algorithm=supervised", "train.mu=0",
                                      "train.iterations=4", "train.eval_every=4"], "supervised")
    assert (supervised / "results.json").is_file()


def test_launch_keys_have_one_definition_that_every_consumer_uses() -> None:
    """Hydra's sweep directory names, the report's grouping and a resume all skip exactly LAUNCH_KEYS."""
    import yaml

    from ssl_imwa.keys import LAUNCH_KEYS
    from ssl_imwa.report import is_bookkeeping_key

    root_config = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    assert sorted(root_config["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]) == sorted(LAUNCH_KEYS)
    assert all(is_bookkeeping_key(key) for key in LAUNCH_KEYS)
    assert not is_bookkeeping_key("train.lr") and not is_bookkeeping_key("imwa.k")


def test_an_integer_key_says_integer() -> None:
    """`imwa.k=0` said 'expected a finite value in (0, inf)', odd for a count."""
    cases = {"imwa.k=0": "imwa.k=0: expected an integer >= 1",
             "seed=-1": "seed=-1: expected an integer in [0, 4294967295]",
             "train.num_threads=-1": "train.num_threads=-1: expected an integer >= 0",
             "train.lr=0": "train.lr=0.0: expected a finite value in (0, inf)"}  # a float key keeps the interval
    for override, message in cases.items():
        with pytest.raises(ValueError) as error:
            validate(compose_config(["experiment=quickstart", override]))
        assert str(error.value) == message
