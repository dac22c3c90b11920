"""The checkout's config tree composed with Hydra's compose API, as `python main.py` composes it.

The one place the project composes a config outside a Hydra launch: main.py's preflight, the
Python API, the benchmarks and the tests all call `compose_config`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

# The checkout's config tree, the one main.py reads (the package is installed editable: pip install -e .).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_config(overrides: Sequence[str] = (), run_dir: str | Path | None = None,
                   with_hydra: bool = False) -> DictConfig:
    """The config `python main.py <overrides>` trains, unvalidated, from the same files and schema; a bad
    override raises Hydra's or OmegaConf's own error.

    `run_dir` (any path) replaces the config's `${hydra:runtime.output_dir}`, which only a Hydra
    launch can resolve; `with_hydra` keeps the `hydra` node (Hydra's own settings).
    """
    from hydra import compose, initialize_config_dir

    from ssl_imwa.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=with_hydra)
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    return cfg
