"""Entry point: `python main.py algorithm=acr dataset=cifar10_lt imwa.k=2 imwa.episodes=4`."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssl_imwa.config import register_configs
from ssl_imwa.distributed import rank_from_environment
from ssl_imwa.user_errors import refuse_an_unwritable_directory, short_user_errors

register_configs()

# torchrun: processes other than 0 write nothing of Hydra's (process 0's run directory reaches them
# by broadcast, ssl_imwa.run.agree_on_run_dir) and do their own logging (ssl_imwa.run.log_secondary_process).
SECONDARY_PROCESS_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=disabled")
# resume=true: Hydra's record of the run (.hydra/) stays the original launch's, whatever this one says.
RESUME_OVERRIDES = ("hydra.output_subdir=null",)


def _protective_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that keep a run directory's record intact, added unless the user set them."""
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in argv[1:]}
    extra: list[str] = []
    if rank_from_environment() != 0:
        extra += SECONDARY_PROCESS_OVERRIDES
    if "resume=true" in [arg.lower() for arg in argv[1:]]:
        extra += [override for override in RESUME_OVERRIDES if override not in extra]
    return argv + [override for override in extra if override.split("=", 1)[0] not in given]


def _output_directory(argv: list[str]) -> Path:
    """Where Hydra will write: the typed run (or sweep) directory, else the parent of its default."""
    sweep = any(arg in ("-m", "--multirun") for arg in argv[1:])
    key = "hydra.sweep.dir=" if sweep else "hydra.run.dir="
    typed = [arg[len(key):] for arg in argv[1:] if arg.startswith(key)]
    return Path(typed[-1]) if typed else Path("multirun" if sweep else "outputs")


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from ssl_imwa.run import run

    with short_user_errors():
        results = run(cfg, list(HydraConfig.get().overrides.task))
    # Returned so Hydra sweepers can optimise it; None when the run stopped at train.stop_at.
    return None if results is None else results["final"]["balanced_acc"]


if __name__ == "__main__":
    with short_user_errors():  # before Hydra, whose logging would fail with a long traceback
        refuse_an_unwritable_directory(_output_directory(sys.argv))
    sys.argv = _protective_overrides(sys.argv)
    main()
