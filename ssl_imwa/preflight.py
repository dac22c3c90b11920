"""Before Hydra starts: the command line composed as Hydra will compose it, each mistake in one line,
and the dry run `python main.py <overrides> --check`.

Hydra composes the config before this project's code runs and prints its own errors (8 to 16
lines: an unknown key is answered with advice to add it with `+`). main.py composes the same
overrides first, through Hydra's compose API, and says what is wrong as `error: <one line>`:
an unknown key with the closest key of the schema, an unknown config-group option with the
options there are, an override Hydra cannot parse, a value of the wrong type.

`--check` goes further: every job of the command line (each combination of a sweep's values) is
composed and validated as a run would validate it (ssl_imwa.config.validate, which includes the
dataset's split counts where the class count is known without reading images), and nothing is
written anywhere. It prints `config OK ...` and exits 0, or prints every mistake it can attribute
to an override, one per line, and exits 1.
"""
from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_imwa.composition import CONFIG_DIR, compose_config

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

CHECK_FLAG = "--check"
GRAMMAR = "https://hydra.cc/docs/1.3/advanced/override_grammar/basic"
# Hydra's own command-line flags after which nothing is composed for a run (help, shell completion, ...).
NOT_A_LAUNCH = ("help", "hydra_help", "info", "shell_completion", "experimental_rerun")


def config_groups(search_path: Sequence[str] = ()) -> dict[str, list[str]]:
    """The config groups and their options (`<group>/<option>.yaml`): this project's configs/ and the
    folders a `hydra.searchpath=[file://...]` override adds, where a plugin ships its config files."""
    folders = [CONFIG_DIR] + [Path(entry.removeprefix("file://")) for entry in search_path
                              if entry.startswith("file://")]
    groups: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.is_dir():
                groups.setdefault(path.name, set()).update(option.stem for option in path.glob("*.yaml"))
    return {group: sorted(options) for group, options in sorted(groups.items())}


def _search_path(parsed: list[Override]) -> list[str]:
    """The folders a `hydra.searchpath=[...]` override adds (empty without one)."""
    for override in parsed:
        if override.key_or_group == "hydra.searchpath" and not override.is_sweep_override():
            value = override.value()
            return [str(entry) for entry in value] if isinstance(value, list) else [str(value)]
    return []


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """Hydra's reading of each override; one that does not parse is named in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as error:
            reason = (str(getattr(error, "message", "") or error).strip().splitlines() or ["not an override"])[0]
            raise ValueError(f"cannot read the override {text!r}: {reason} (the override grammar: {GRAMMAR})") from None
    return parsed


def _values(override: Override) -> list[str]:
    """The values a (possibly sweeping) override takes, as override text; [] when they cannot be listed."""
    if not override.is_sweep_override():
        if "=" not in override.input_line:
            return []
        value = override.value()  # unquoted; a list for a multi-select group option
        return [str(item) for item in value] if isinstance(value, list) else ["null" if value is None else str(value)]
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - a glob or an interval (for an optimising sweeper): not listable
        return []


def _check_group_options(parsed: list[Override]) -> None:
    groups = config_groups(_search_path(parsed))
    for override in parsed:
        group = override.key_or_group
        if group not in groups or override.is_delete():
            continue
        for value in (value.strip("'\"") for value in _values(override)):
            if value not in groups[group] and value != "null":
                close = difflib.get_close_matches(value, groups[group], n=1)
                hint = f"; did you mean {group}={close[0]}?" if close else ""
                raise ValueError(f"{group}={value}: no such option; {group}= takes one of "
                                 f"{', '.join(groups[group])}{hint}")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    if isinstance(node, DictConfig):
        for key in node:
            keys.append(f"{prefix}{key}")
            keys.extend(_flat_keys(node._get_node(key), f"{prefix}{key}."))
    return keys


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    from omegaconf import DictConfig

    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in list(node.keys()):
            return False
        node = node._get_node(part)
    return True


def unknown_key_message(cfg: DictConfig, key: str) -> str:
    """'unknown key train.iteratons; did you mean train.iterations?', from the keys of the composed schema."""
    keys = _flat_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return f"unknown key {key}; did you mean {close[0]}?"
    section, _, _ = key.rpartition(".")
    siblings = [name.rpartition(".")[2] for name in keys if name.rpartition(".")[0] == section]
    where = f"{section} has" if section else "the top level has"
    return f"unknown key {key}; {where} {', '.join(siblings)}"


def _key_problem(base: DictConfig, override: Override) -> str | None:
    """What is wrong with a key override against the composed schema `base`, if anything."""
    key = override.key_or_group
    if override.is_force_add():
        return None
    exists = _has_key(base, key)
    if override.is_delete() and not exists:
        return f"~{key}: there is no key {key} to delete"
    if override.is_add() and exists:
        return f"{override.input_line}: {key} already exists; set it without the +: {override.input_line[1:]}"
    if not override.is_add() and not override.is_delete() and not exists:
        return unknown_key_message(base, key)
    return None


def _composition_message(error: BaseException) -> str:
    """Hydra's composition error in one line: the override, then what its cause says."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = error.__cause__
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    merging = re.match(r"Error merging override (.+)", first)
    if merging and detail:
        return f"{merging.group(1)}: {detail}"
    return f"{first}: {detail}" if detail and detail not in first else first


def compose_overrides(overrides: Sequence[str], run_dir: str | Path | None = None) -> DictConfig:
    """The config Hydra composes from `overrides` (no sweeps), or a ValueError saying in one line what is wrong.

    `run_dir` (any path) replaces the config's `${hydra:runtime.output_dir}`, which only a Hydra
    launch can resolve."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parsed = parse_overrides(overrides)
    _check_group_options(parsed)
    try:
        return compose_config(overrides, run_dir)
    except (HydraException, OmegaConfBaseException) as error:
        message = _composition_message(error)
    groups = config_groups(_search_path(parsed))
    group_overrides = [override.input_line for override in parsed
                       if override.key_or_group in groups or "/" in override.key_or_group]
    try:
        base = compose_config(group_overrides, with_hydra=True)  # hydra.* keys are checked too
    except (HydraException, OmegaConfBaseException):
        base = None
    if base is not None:
        for override in parsed:
            if override.key_or_group not in groups and "/" not in override.key_or_group:
                problem = _key_problem(base, override)
                if problem:
                    raise ValueError(problem)
    raise ValueError(message)


def jobs(overrides: Sequence[str]) -> list[list[str]]:
    """Every job a command line launches: with a sweep (`train.lr=0.1,0.03`), one per combination of its values."""
    parsed = parse_overrides(overrides)
    choices = []
    for override in parsed:
        values = _values(override) if override.is_sweep_override() else []
        choices.append([f"{override.get_key_element()}={value}" for value in values] or [override.input_line])
    return [list(combination) for combination in itertools.product(*choices)]


def sample_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """Jobs that together use every value of every sweep: each value once, with the other sweeps' first."""
    parsed = parse_overrides(overrides)
    choices = [[f"{override.get_key_element()}={value}" for value in _values(override)]
               if override.is_sweep_override() else [] for override in parsed]
    first = [options[0] if options else override.input_line for options, override in zip(choices, parsed)]
    sampled = [first]
    for position, options in enumerate(choices):
        sampled += [[*first[:position], option, *first[position + 1:]] for option in options[1:]]
    return sampled


def check_jobs(overrides: Sequence[str], run_dir: Path) -> tuple[list[str], list[str]]:
    """Compose and validate every job of a command line without loading data or writing anything.

    Returns the mistakes found (one line each) and a one-line summary of each valid job. Within a
    job, a value refused by validation is set back to its default to look for the next one, so
    that one check lists every bad value typed on the command line.
    """
    from ssl_imwa.config import validate
    from ssl_imwa.resume import resumed_config

    problems: list[str] = []
    summaries: list[str] = []
    for job in jobs(overrides):
        remaining = list(job)
        while True:
            try:
                cfg = compose_overrides(remaining, run_dir)
                if cfg.get("resume", False):
                    cfg = resumed_config(cfg, remaining)
                typed = validate(cfg)
                if remaining == job:
                    summaries.append(f"{typed.algorithm.name} on {typed.dataset.name} ({typed.model.name}), "
                                     f"k={typed.imwa.k} episodes={typed.imwa.episodes}, "
                                     f"{typed.train.iterations} steps")
                break
            except (ValueError, TypeError, LookupError, RuntimeError, OSError, ImportError) as error:
                from ssl_imwa.user_errors import message_of

                message = message_of(error)
                if message not in problems:
                    problems.append(message)
                culprit = _typed_culprit(message, remaining)
                if culprit is None:
                    break
                remaining.remove(culprit)
    return problems, summaries


def preflight(argv: Sequence[str], run_dir: Path, check: bool) -> None:
    """main.py, before Hydra: compose the command line's first job, so that a composition error is
    one line; with `check`, validate every job, print the verdict and exit (0: valid, 1: not)."""
    import os
    import sys

    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv[1:]))
    if any(getattr(args, flag, None) for flag in NOT_A_LAUNCH) or args.config_path or args.config_name \
            or args.config_dir:
        return  # Hydra's help, completion, another config tree: nothing of ours to check
    if not check:
        if os.environ.get("HYDRA_FULL_ERROR") != "1":  # with it, Hydra's own error and traceback
            for job in sample_jobs(args.overrides):
                compose_overrides(job, None)
        return
    problems, summaries = check_jobs(args.overrides, run_dir)
    if problems:
        print("\n".join(f"error: {problem}" for problem in problems), file=sys.stderr)
        raise SystemExit(1)
    jobs_checked = f"{len(summaries)} jobs" if len(summaries) > 1 else summaries[0]
    print(f"config OK: {jobs_checked}; validated without loading data, nothing written")
    raise SystemExit(0)


def _typed_culprit(message: str, overrides: list[str]) -> str | None:
    """The typed override a message is about: the key it starts with (`train.lr=-1.0: expected ...`,
    `unknown key train.iteratons; ...`), else the first typed key it names as `key=`."""
    match = re.match(r"(?:unknown key )?[+~]?([\w.@/-]+)", message)
    named = [match.group(1)] if match else []
    named += re.findall(r"([\w.]+)=", message)
    typed = {override.split("=", 1)[0].lstrip("+~"): override for override in overrides}
    return next((typed[key] for key in named if key in typed), None)
