"""A mistake in the input is reported in a line or two; a bug keeps its traceback.

An error is the user's to fix when this project raised it on purpose (a `raise` statement in its
own code: a bad value, a missing file, a refused resume), when it is a config error from
OmegaConf, or when the machine refused a file operation (no space, read-only, no permission,
no such file). Those print as `error: <message>`; the full traceback goes only to the run's log
files, or to the console with `HYDRA_FULL_ERROR=1` (Hydra's own switch). Everything else, an
exception from inside a library or a broken invariant, is re-raised untouched: it is a bug, and
its traceback is what a bug report needs.
"""
from __future__ import annotations

import contextlib
import errno
import linecache
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Exception types this project raises for bad input; an AssertionError or an IndexError is a bug.
# FloatingPointError: training stopped on purpose at a non-finite loss (ssl_imwa.imwa), e.g. train.lr too large.
DELIBERATE_TYPES = (ValueError, TypeError, LookupError, RuntimeError, OSError, ImportError, FloatingPointError)
# File operations the machine refused: the message (with its path) is the whole story.
REFUSED_FILE_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                       errno.EIO, errno.ENOTDIR, errno.EISDIR)
FULL_ERROR_VARIABLE = "HYDRA_FULL_ERROR"


def raised_on_purpose(error: BaseException) -> bool:
    """True when `error` reports bad input or a refused file operation rather than a bug."""
    if isinstance(error, OmegaConfBaseException):
        return True
    if isinstance(error, OSError) and error.errno in REFUSED_FILE_ERRNOS:
        return True
    if not isinstance(error, DELIBERATE_TYPES) or error.__traceback__ is None:
        return False
    innermost = traceback.extract_tb(error.__traceback__)[-1]
    source = Path(innermost.filename).resolve()
    ours = source.is_relative_to(PROJECT_ROOT) and "site-packages" not in source.parts
    return ours and linecache.getline(innermost.filename, innermost.lineno).lstrip().startswith("raise")


def message_of(error: BaseException) -> str:
    """The message a user reads: a KeyError's own text, not its repr in quotes; an OmegaConf error's
    first line (the key is in it; the indented lines after it repeat the key and the schema type)."""
    if isinstance(error, OmegaConfBaseException):
        key = getattr(error, "full_key", None)
        return str(error).splitlines()[0] + (f" (key {key})" if key else "")
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def _write_traceback_to_log_files(error: BaseException) -> None:
    """The full traceback for whoever debugs later, in the run's log files only (not the console)."""
    text = "".join(traceback.format_exception(error))
    for handler in logging.getLogger().handlers + logging.getLogger("ssl_imwa").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream.write(f"error: {text}")
            handler.flush()


@contextlib.contextmanager
def short_user_errors() -> Iterator[None]:
    """Print a user's mistake as `error: <message>` and exit with status 1; re-raise anything else."""
    try:
        yield
    except KeyboardInterrupt:  # outside training (which stops gracefully): while loading data, say
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if os.environ.get(FULL_ERROR_VARIABLE) == "1" or not raised_on_purpose(error):
            raise
        _write_traceback_to_log_files(error)
        print(f"error: {message_of(error)}\n({FULL_ERROR_VARIABLE}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def refuse_an_unwritable_directory(directory: Path) -> None:
    """Fail before any work when `directory` cannot be created (read-only file system, no permission).

    Creating and removing a probe directory in the nearest existing ancestor is the only reliable
    test: `os.access` says yes to root even on a read-only mount.
    """
    ancestor = directory.absolute()
    refuse_a_name_too_long(ancestor)
    while not ancestor.exists():
        ancestor = ancestor.parent
    probe = ancestor / f".ssl_imwa_write_probe_{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as error:
        code = errno.errorcode.get(error.errno or 0, "?")
        raise OSError(error.errno, f"cannot create run directory {directory}: {ancestor} is not writable "
                      f"({os.strerror(error.errno or 0)}, {code}); choose another with hydra.run.dir=...") from None
    probe.rmdir()


def refuse_a_name_too_long(directory: Path) -> None:
    """A run directory whose name the file system cannot hold (ENAMETOOLONG), said before any work."""
    limits = (_path_limit(directory, "PC_NAME_MAX", 255), _path_limit(directory, "PC_PATH_MAX", 4096))
    longest = max(directory.parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > limits[0]:
        raise OSError(errno.ENAMETOOLONG, f"cannot create run directory {str(directory)[:40]}...: its part "
                      f"'{longest[:16]}...' has {len(os.fsencode(longest))} bytes, the file system allows "
                      f"{limits[0]} per name; choose a shorter hydra.run.dir=...")
    if len(os.fsencode(str(directory))) >= limits[1]:
        raise OSError(errno.ENAMETOOLONG, f"cannot create run directory {str(directory)[:40]}...: the path has "
                      f"{len(os.fsencode(str(directory)))} bytes, the file system allows {limits[1] - 1}; choose a "
                      "shorter hydra.run.dir=...")


def _path_limit(directory: Path, name: str, default: int) -> int:
    """The file system's limit `name` where `directory` would be created (its nearest existing ancestor)."""
    ancestor = directory
    while True:
        try:
            if ancestor.exists():
                return os.pathconf(ancestor, name)
        except (OSError, ValueError):
            pass
        if ancestor == ancestor.parent:
            return default
        ancestor = ancestor.parent
