"""A resume continues a run as its own record says: the saved config, plus this launch's settings."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_imwa.keys import LAUNCH_KEYS

# Config groups (`algorithm=acr`) are choices, compared with the original launch's, not values.
CONFIG_GROUPS = tuple(sorted(path.name for path in (Path(__file__).resolve().parents[1] / "configs").iterdir()
                             if path.is_dir()))


def resumed_config(cfg: DictConfig, command_line: Sequence[str]) -> DictConfig:
    """The run's saved `config.yaml` with this launch's LAUNCH_KEYS on top.

    Keys not typed again come from the record, so a resume needs no retyping of the original
    overrides. A key typed on the command line that is not a launch key must agree with the
    record, and a config group typed there (`algorithm=acr`) with the group chosen at the original
    launch (Hydra's `.hydra/hydra.yaml`); otherwise the resume is refused, naming each.
    Without a saved config (nothing ran there) `cfg` is returned as it is.
    """
    run_dir = Path(str(cfg.run_dir))
    record = run_dir / "config.yaml"
    if not record.is_file():
        if not (run_dir / "checkpoints").is_dir():  # said before any data loads
            raise FileNotFoundError(f"{run_dir} holds no run (no config.yaml, no checkpoints/): nothing to resume "
                                    "(run without resume=true, or point hydra.run.dir at the run to continue)")
        return cfg
    saved = _read_record(record)
    if not len(saved):  # would resume with the schema's defaults: another dataset, another model
        raise ValueError(f"{record} (the run's saved config) is empty: resume=true continues a run as its "
                         "config.yaml records it; restore the file (.hydra/config.yaml holds the launch's config), "
                         "or start a new run")
    typed = {override.split("=", 1)[0].lstrip("+~"): override.split("=", 1)[1]
             for override in command_line if "=" in override and not override.startswith("hydra")}
    conflicts = []
    for key in typed:
        if key in LAUNCH_KEYS or key in CONFIG_GROUPS or key not in saved and "." not in key:
            continue
        now, then = OmegaConf.select(cfg, key), OmegaConf.select(saved, key)
        if _plain(now) != _plain(then):
            conflicts.append(f"{key}: run has {_plain(then)!r}, command line has {_plain(now)!r}")
    choices = launch_choices(run_dir)
    for group, choice in typed.items():
        if group in choices and choices[group] != choice:
            conflicts.append(f"{group}: run was launched with {group}={choices[group]}, command line has {choice}")
    if conflicts:
        raise RuntimeError(f"resume=true continues {run_dir} as its config.yaml records it, so these cannot change "
                           f"(start a new run to change them): {'; '.join(conflicts)}. A resume may change only "
                           f"{', '.join(LAUNCH_KEYS[2:])}")
    for key in LAUNCH_KEYS:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    return saved


def _read_record(record: Path) -> DictConfig:
    """The run's saved config.yaml, validated; damage (bad YAML, a key or value edited into something
    invalid) is said in one line naming the file."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    from ssl_imwa.config import validate
    from ssl_imwa.user_errors import message_of

    what = f"{record} (the run's saved config)"
    try:
        saved = OmegaConf.load(record)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{what} is not valid YAML: {problem}{where}; repair it, or start a new run") from None
    except (OmegaConfBaseException, ValueError) as error:
        raise ValueError(f"{what} cannot be read: {message_of(error)}") from None
    if not isinstance(saved, DictConfig):
        raise TypeError(f"{what} holds a {type(saved).__name__}, not a mapping of keys; repair it, or start a new run")
    if len(saved):  # (an empty record is refused where it is read)
        try:
            validate(saved)
        except (ValueError, TypeError, LookupError, ImportError, OmegaConfBaseException) as error:
            raise ValueError(f"{what} is not a valid config: {message_of(error)}") from error
    return saved


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def launch_choices(run_dir: Path) -> dict[str, str]:
    """Config groups chosen at the run's first launch, from Hydra's record (empty without one)."""
    record = run_dir / ".hydra" / "hydra.yaml"
    if not record.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(record), "hydra.runtime.choices", default=None)
    return {} if choices is None else {str(key): str(value) for key, value in choices.items()}


def refuse_a_resume_of_nothing(run_dir: Path | None) -> None:
    """resume=true where no run is, said before Hydra creates the directory (and a main.log in it).

    `run_dir`: the typed hydra.run.dir (None: not typed, so Hydra's default, a new timestamped one).
    """
    if run_dir is None:
        raise FileNotFoundError("resume=true needs the run to continue: hydra.run.dir=<its directory> (without it, "
                                "a new empty directory: there is no run to resume there)")
    if not run_dir.is_dir():
        why = "does not exist" if not run_dir.exists() else "is not a directory"
    elif not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").is_dir():
        why = "holds no run (no config.yaml, no checkpoints/)"
    else:
        return
    raise FileNotFoundError(f"resume=true: {run_dir} {why}: there is no run to resume (nothing to resume; run "
                            "without resume=true to start one, or point hydra.run.dir at the run to continue)")
