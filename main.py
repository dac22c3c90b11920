"""Entry point: `python main.py algorithm=acr dataset=cifar10_lt imwa.k=2 imwa.episodes=4`."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssl_imwa.config import register_configs
from ssl_imwa.distributed import rank_from_environment
from ssl_imwa.preflight import CHECK_FLAG, preflight
from ssl_imwa.resume import refuse_a_resume_of_nothing
from ssl_imwa.sweep_jobs import SWEEP
from ssl_imwa.user_errors import refuse_an_unwritable_directory, short_user_errors

register_configs()

# torchrun: processes other than 0 write nothing of Hydra's (process 0's run directory reaches them
# by broadcast, ssl_imwa.run.agree_on_run_dir) and do their own logging (ssl_imwa.run.log_secondary_process).
SECONDARY_PROCESS_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=disabled")
# Every launch: Hydra writes no record (.hydra/) before this project's code has accepted the launch (a
# refused one, or a resume, would overwrite the run's own); the run writes it once accepted (_hydra_record).
RECORD_OVERRIDES = ("hydra.output_subdir=null",)


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Hydra's flags that take a value: an override typed after one is still read as an override.
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--experimental-rerun", "--shell-completion", "-sc")


def _protective_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that keep a run directory's record intact, added unless the user set them.

    They go right after the typed overrides: Hydra's argument parser reads the overrides as one
    run of positional arguments, so one added after a flag (`--cfg job`) would be refused.
    """
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in argv[1:]}
    extra: list[str] = list(RECORD_OVERRIDES)
    if rank_from_environment() != 0:
        extra += [override for override in SECONDARY_PROCESS_OVERRIDES if override not in extra]
    added = [override for override in extra if override.split("=", 1)[0] not in given]
    after = len(argv)
    positions = [index for index, arg in enumerate(argv) if index and not arg.startswith("-")
                 and argv[index - 1] not in VALUE_FLAGS]
    if positions:
        after = positions[-1] + 1
    return argv[:after] + added + argv[after:]


def _resume_target(argv: list[str]) -> Path | None | bool:
    """For a plain `resume=true` launch: the typed hydra.run.dir (None: none typed); False otherwise
    (no resume, a sweep, Hydra's --cfg, --help, ...: nothing to check before Hydra)."""
    values = [arg.split("=", 1)[1].strip().lower() for arg in argv[1:] if arg.startswith("resume=")]
    if not values or values[-1] not in ("true", "yes", "on", "1") or any(arg.startswith("-") for arg in argv[1:]):
        return False
    typed = [arg for arg in argv[1:] if arg.startswith("hydra.run.dir=")]
    return Path(_override_value(typed[-1])) if typed else None


def _hydra_record(cfg: DictConfig) -> dict[str, str] | None:
    """Hydra's record of this launch (.hydra/ config.yaml, hydra.yaml, overrides.yaml), as Hydra writes it
    (hydra.core.utils.run_job) had it not been told hydra.output_subdir=null; None when the user set
    hydra.output_subdir (Hydra then wrote it, or was told not to)."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    if not _WRITE_HYDRA_RECORD:
        return None
    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = ".hydra"
        hydra_cfg.hydra.overrides.hydra = [override for override in hydra_cfg.hydra.overrides.hydra
                                           if override not in RECORD_OVERRIDES]
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


_WRITE_HYDRA_RECORD = False  # set when main.py added hydra.output_subdir=null itself


def _output_directory(argv: list[str]) -> Path:
    """Where Hydra will write: the typed run (or sweep) directory, else the parent of its default."""
    sweep = any(arg in ("-m", "--multirun") for arg in argv[1:])
    key = "hydra.sweep.dir=" if sweep else "hydra.run.dir="
    typed = [arg for arg in argv[1:] if arg.startswith(key)]
    return Path(_override_value(typed[-1])) if typed else Path("multirun" if sweep else "outputs")


def _override_value(override: str) -> str:
    """The value Hydra will read from `key=value`: unquoted (`hydra.run.dir='/runs/ü'` is /runs/ü)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001 - unparsable: the preflight names it; the literal text meanwhile
        value = None
    return value if isinstance(value, str) else override.split("=", 1)[1]


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ssl_imwa.cluster import export_ranks_of_a_slurm_job
    from ssl_imwa.run import run

    export_ranks_of_a_slurm_job()

    def job() -> dict | None:
        return run(cfg, list(HydraConfig.get().overrides.task), _hydra_record(cfg))

    searching = HydraConfig.get().sweeper._target_ != BASIC_SWEEPER
    if searching and not cfg.dataset.get("val_per_class"):
        with short_user_errors():
            raise ValueError(f"hydra/sweeper={HydraConfig.get().runtime.choices.get('hydra/sweeper')} maximises the "
                             "final balanced accuracy on the validation split, and this run has none: set "
                             "dataset.val_per_class (labeled images per class held out), never tune on the test split")
    if HydraConfig.get().mode == RunMode.MULTIRUN:   # one failed job does not end the sweep
        results = SWEEP.run(job, str(cfg.get("run_dir")))
    else:
        with short_user_errors():
            results = job()
    # What a sweeper optimises: the final model's balanced accuracy on the held-out split (None without
    # one, or when the run stopped at train.stop_at or failed: Optuna records the trial as failed).
    return None if results is None or results["final_val"] is None else results["final_val"]["balanced_acc"]


if __name__ == "__main__":
    check = CHECK_FLAG in sys.argv[1:]  # the dry run: validate every job, write nothing (ssl_imwa.preflight)
    sys.argv = [arg for arg in sys.argv if arg != CHECK_FLAG]
    with short_user_errors():  # before Hydra, whose logging would fail with a long traceback
        refuse_an_unwritable_directory(_output_directory(sys.argv))
        if (resumed := _resume_target(sys.argv)) is not False:  # before Hydra creates the directory
            refuse_a_resume_of_nothing(resumed)
        preflight(sys.argv, _output_directory(sys.argv), check)  # Hydra's composition errors in one line
    _WRITE_HYDRA_RECORD = not any(arg.split("=", 1)[0].lstrip("+~") == "hydra.output_subdir" for arg in sys.argv[1:])
    sys.argv = _protective_overrides(sys.argv)
    main()
    sys.exit(SWEEP.exit_status())
