"""Entry point: `python main.py algorithm=acr dataset=cifar10_lt imwa.k=2 imwa.episodes=4`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ssl_imwa.config import register_configs

register_configs()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from ssl_imwa.run import run

    results = run(cfg)
    # Returned so Hydra sweepers can optimise it; None when the run stopped at train.stop_at.
    return None if results is None else results["final"]["balanced_acc"]


if __name__ == "__main__":
    main()
