"""Typed configuration: the schema Hydra composes into, and validation before any work starts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.merge import MOMENTUM_POLICIES
from ssl_imwa.models.config import ModelConfig
from ssl_imwa.trackers import check_loggers
from ssl_imwa.validation import (
    expect_choice,
    expect_positive,
    expect_range,
    refuse_unknown,
    typed_section,
)

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    iterations: int = 250_000      # T: steps per replica (per generation, where the algorithm chains them)
    batch_size: int = 64           # B, labeled images per step
    mu: int = 7                    # unlabeled images per step = mu * B
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    wd_exclude_bias_bn: bool = False  # True: no weight decay on biases and BN parameters (ACR)
    schedule: str = "cosine"       # cosine: lr*cos(7*pi*k/(16*K)); constant
    eval_every: int = 500
    eval_batch_size: int = 256
    checkpoint_every: int = 0      # 0: checkpoint at every evaluation
    log_every: int = 50
    precision: str = "fp32"        # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler)
    channels_last: bool = False
    num_threads: int = 0           # torch intra-op threads; 0 keeps torch's default
    progress: bool = True          # tqdm bar
    stop_at: int = 0               # stop (checkpointed) after this global step; 0 = run to the end


@dataclass
class IMWAConfig:
    k: int = 1           # replicas
    episodes: int = 1    # E; k=1, episodes=1 is a plain run
    merge: str = "uniform"
    momentum: str = "average"   # optimiser momentum at a merge: average | keep | reset
    timeout_s: float = 600.0    # W > 1: a process that does not reach a merge within this fails the run
    # merge_NNN.pt checkpoints kept on disk: 0 keeps all; otherwise the newest N (at least 2: a resume over
    # several processes may need the merge before the newest, when one process was killed writing it)
    keep_merges: int = 0
    # D: processes per replica (DistributedDataParallel over a replica group; each takes 1/D of every batch)
    data_parallel: int = 1
    # Each merge strategy's options are the section imwa.<strategy> (imwa.twa.steps=10), typed at
    # validation by the dataclass the strategy registered (docs/imwa.md, "Merge strategies").


@dataclass
class Config:
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    # None: deterministic on CPU, fast on CUDA (cuDNN autotuning, non-deterministic kernels allowed);
    # true/false ask for one or the other on any device (docs/performance.md).
    deterministic: bool | None = None
    # Hydra's output directory (configs/config.yaml); None only where Hydra has none, as in `--cfg job`.
    run_dir: str | None = None
    plugins: list[str] = field(default_factory=list)
    # Where the run logs besides metrics.jsonl: tensorboard, wandb, mlflow (ssl_imwa.trackers, docs/cluster.md).
    logger: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Untyped and open while Hydra composes (register_configs), so that a dataset's or a backbone's own
    # options (`dataset.<option>`, `model.<option>`) fit; validate() types each section by the dataclass
    # its plugin registered and names any unknown key there (docs/extending.md).
    dataset: Any = field(default_factory=lambda: asdict(DatasetConfig()))
    model: Any = field(default_factory=lambda: asdict(ModelConfig()))
    algorithm: Any = field(default_factory=lambda: {"name": "fixmatch"})
    train: TrainConfig = field(default_factory=TrainConfig)
    imwa: IMWAConfig = field(default_factory=IMWAConfig)


def register_configs() -> None:
    """Make the schema available to Hydra as `base_config` (configs/config.yaml lists it first).

    `imwa`, `dataset`, `model` and `algorithm` accept keys the schema does not declare while Hydra
    composes: the options of the plugins chosen there (`imwa.twa.steps=10`, `dataset.noise=0.3`,
    `model.width=8`, `algorithm.weight=0.5`),
    which only the plugins know; no `+` is needed. validate() types each by the dataclass its plugin
    registered and refuses any other key there, by name, with the closest known key.
    """
    from ssl_imwa.sweep_jobs import swept_dirname

    if not OmegaConf.has_resolver("swept_dirname"):   # configs/config.yaml's hydra.sweep.subdir
        OmegaConf.register_new_resolver("swept_dirname", lambda task, fallback, sweep_dir=None:
                                        swept_dirname(list(task), fallback, sweep_dir))
    schema = OmegaConf.structured(Config)
    for section in (schema.imwa, schema.dataset, schema.model, schema.algorithm):
        OmegaConf.set_struct(section, False)
    ConfigStore.instance().store(name="base_config", node=schema)


def generation_count(cfg: DictConfig) -> int:
    """How many generations a validated config's run chains (its algorithm config says; 1 for most)."""
    return OmegaConf.to_object(cfg.algorithm).generation_count()


def validate(cfg: DictConfig) -> DictConfig:
    """Check the composed config; type the algorithm section, and each merge strategy's `imwa.<name>`
    section, with the dataclass its plugin registered.

    Unknown keys and wrong types raise OmegaConf errors that name the key; bad values raise
    ValueError naming the key and what was expected.
    """
    from ssl_imwa.algorithm import get_algorithm
    from ssl_imwa.data.build import check_labeled_counts, validate_dataset
    from ssl_imwa.data.dataset import typed_dataset_section
    from ssl_imwa.models.factory import typed_model_section
    from ssl_imwa.registry import load_plugins

    # A required value left unset ('???' in a config file) would otherwise take the schema's default.
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{', '.join(missing)}: required, but no value was given (set it on the command line, "
                         f"e.g. {missing[0]}=...)")
    # Merged as plain data: a section that already carries its dataclass type (as Hydra composes it)
    # would otherwise accept a key added with `+train.bogus=1` without a word.
    plain = OmegaConf.to_container(cfg)
    merge_sections = _pop_merge_sections(plain)
    typed = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(plain))
    load_plugins(list(typed.plugins))
    _type_merge_options(typed.imwa, merge_sections, list(typed.plugins))  # after plugins: they may add one
    algorithm_cls = get_algorithm(typed.algorithm.name)
    typed.algorithm = typed_section("algorithm", algorithm_cls.Config, typed.algorithm)
    algorithm_config = OmegaConf.to_object(typed.algorithm)
    algorithm_config.validate()
    _check_train(typed.train, algorithm_cls.uses_unlabeled(), typed.algorithm.name, algorithm_config.generation_count())
    typed.model = typed_model_section(typed.model)  # after plugins: they may register a backbone
    expect_range("model.bn_momentum", typed.model.bn_momentum, 0, 1)
    typed.dataset = typed_dataset_section(typed.dataset)  # ...or a dataset
    dataset = OmegaConf.to_object(typed.dataset)
    validate_dataset(dataset)
    check_labeled_counts(dataset, typed.train.batch_size)  # where the class count is known before reading
    expect_range("seed", typed.seed, 0, 2 ** 32 - 1)  # numpy's seeds are unsigned 32-bit
    check_loggers(list(typed.logger))
    _check_imwa(typed.imwa, typed.dataset.val_per_class, typed.train.iterations)
    if typed.train.batch_size % typed.imwa.data_parallel:
        raise ValueError(f"train.batch_size={typed.train.batch_size} is not divisible by imwa.data_parallel="
                         f"{typed.imwa.data_parallel}: each data-parallel process takes an equal slice of every batch")
    if not (typed.device == "cpu" or typed.device.startswith("cuda")):
        raise ValueError(f"device='{typed.device}': expected 'cpu', 'cuda' or 'cuda:N'")
    return typed


def _check_train(train: DictConfig, uses_unlabeled: bool, algorithm: str, generations: int) -> None:
    expect_choice("train.schedule", train.schedule, SCHEDULES)
    expect_choice("train.precision", train.precision, PRECISIONS)
    expect_positive("train.iterations", train.iterations)
    expect_positive("train.batch_size", train.batch_size)
    expect_positive("train.mu", train.mu, allow_zero=True)
    if uses_unlabeled and train.mu < 1:
        raise ValueError(f"train.mu={train.mu}: {algorithm} learns from unlabeled images, so each step "
                         "needs mu * batch_size of them: expected train.mu >= 1")
    expect_positive("train.eval_every", train.eval_every)
    expect_positive("train.lr", train.lr)
    expect_range("train.momentum", train.momentum, 0, 1, high_open=True)
    expect_positive("train.weight_decay", train.weight_decay, allow_zero=True)
    expect_positive("train.eval_batch_size", train.eval_batch_size)
    expect_positive("train.log_every", train.log_every)
    expect_positive("train.checkpoint_every", train.checkpoint_every, allow_zero=True)
    expect_positive("train.num_threads", train.num_threads, allow_zero=True)
    # A run of G generations trains G * train.iterations steps per replica (global steps count on).
    expect_range("train.stop_at", train.stop_at, 0, train.iterations * generations)


def _check_imwa(imwa: DictConfig, val_per_class: int, iterations: int) -> None:
    from ssl_imwa.merge import MergePlan, get_merge, list_merges, merge_options

    expect_positive("imwa.timeout_s", imwa.timeout_s)
    expect_positive("imwa.k", imwa.k)
    expect_positive("imwa.episodes", imwa.episodes)
    expect_positive("imwa.data_parallel", imwa.data_parallel)
    if imwa.keep_merges < 0 or imwa.keep_merges == 1:
        raise ValueError(f"imwa.keep_merges={imwa.keep_merges}: expected 0 (keep every merge_NNN.pt) or >= 2 "
                         "(a resume over several processes may need the merge before the newest)")
    expect_choice("imwa.merge", imwa.merge, tuple(list_merges()))  # after plugins: they may add one
    expect_choice("imwa.momentum", imwa.momentum, MOMENTUM_POLICIES)
    get_merge(imwa.merge).check(merge_options(imwa), MergePlan(imwa.k, val_per_class))
    if iterations % imwa.episodes:
        raise ValueError(f"train.iterations={iterations} is not divisible by imwa.episodes={imwa.episodes}: "
                         "every episode must run the same number of steps")


def _pop_merge_sections(plain: dict[str, Any]) -> dict[str, Any]:
    """Take the keys that are not IMWAConfig's out of `plain['imwa']`: the merge strategies' option
    sections, typed once the plugins that may register a strategy are loaded."""
    imwa = plain.get("imwa")
    if not isinstance(imwa, dict):
        return {}
    own = {item.name for item in fields(IMWAConfig)}
    return {key: imwa.pop(key) for key in list(imwa) if key not in own}


def _type_merge_options(imwa: DictConfig, sections: dict[str, Any], plugins: list[str]) -> None:
    """Add `imwa.<name>` for every strategy with options this run sees, typed by its dataclass and holding
    the values given in `sections`, and check the values; a section no strategy owns is an unknown key."""
    from ssl_imwa.merge import merge_option_types

    option_types = merge_option_types(plugins)
    refuse_unknown("imwa", sections, [item.name for item in fields(IMWAConfig)] + list(option_types))
    with open_dict(imwa):
        for name, options_type in option_types.items():
            values = sections.get(name, {})
            if not isinstance(values, dict):
                raise TypeError(f"imwa.{name}={values!r}: expected the options of merge strategy {name}, "
                                f"set one by one (imwa.{name}.<option>=...)")
            refuse_unknown(f"imwa.{name}", values, [item.name for item in fields(options_type)])
            try:
                imwa[name] = OmegaConf.merge(OmegaConf.structured(options_type), values)
            except OmegaConfBaseException as error:  # merged on its own: name the key as the user types it
                error.full_key = f"imwa.{name}.{getattr(error, 'full_key', None) or ''}".rstrip(".")
                raise
            options = OmegaConf.to_object(imwa[name])
            if callable(getattr(options, "validate", None)):
                options.validate()


