"""Command lines that speak to people; every radnet and data_prep entry point runs through ``run``.

- A user's mistake — a misspelt flag or config field, a bad config argument, a flag value of
  the wrong type, a missing required flag, a path that is not there — ends as ONE line on
  stderr, ``radnet: error: <what> (<where>)``, and exit status 2. ``--debug`` (or the
  environment variable RADNET_DEBUG=1) shows the traceback instead.
- Libraries stay quiet: INFO lines come only from radnet's and data_prep's own code; other
  libraries (Orbax, Dask, JAX, Grain, ...) show WARNING and above, minus the few warnings radnet
  knows to be expected (``EXPECTED_WARNINGS``). ``--verbosity=1`` (``-v 1``) brings every line
  back.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import contextlib
import sys
import warnings
from typing import Callable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags  # is_config_flag is not re-exported

from radnet import host_memory

DEBUG_ENV = "RADNET_DEBUG"

_DEBUG = flags.DEFINE_bool(
    "debug", False, f"Show the traceback of a user error (a missing path, a misspelt flag or "
    f"config field, a config the run cannot honour) instead of one line; or set {DEBUG_ENV}=1.")

# Warnings of libraries that radnet's own use makes expected, so they would only alarm:
EXPECTED_WARNINGS = (
    # Orbax, restoring a checkpoint's arrays without the data iterator (evaluation, transfer,
    # radnet.pretrained): the iterator is not wanted there.
    "could not be restored",
    # Orbax, restoring onto the host without target shardings (evaluation, pretrained.load):
    # the arrays land on the default device, which is what radnet asks for there.
    "Sharding info not provided",
    "sharding info not provided",
    # Orbax, when radnet opens a run's checkpoints read-only to load them (evaluation,
    # transfer, export): read-only is what it asked for.
    "read_only=True, setting save_interval_steps",
    "Given directory is read only",
    # Orbax, when a checkpoint directory is created on a local file system.
    "Consider using a different checkpointing backend",
)

# Python warnings (warnings.warn) of libraries that are expected and harmless, as regexes:
EXPECTED_PY_WARNINGS = (
    # Dask, when another cluster on this machine holds the dashboard's port 8787: it takes
    # another port, which data_prep/cluster.py logs.
    r"Port \d+ is already in use",
)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Code whose INFO lines a person wants: the project's own packages (not a .venv inside it).
_OWN_CODE = tuple(os.path.join(_ROOT, p) + os.sep for p in ("radnet", "data_prep", "configs"))


class UserError(Exception):
    """A mistake the user can fix (said in one line, no traceback)."""


def debug_wanted(argv: Sequence[str] | None = None) -> bool:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    if flags.FLAGS.is_parsed():
        return bool(_DEBUG.value)
    return any(a in ("--debug", "-debug") for a in (argv or sys.argv))


def error_line(what: str, where: str | None = None) -> str:
    """``radnet: error: <what> (<where>)`` on one line, whatever the message held."""
    what = " ".join(str(what).split())
    return f"radnet: error: {what}" + (f" ({' '.join(where.split())})" if where else "")


def fail(what: str, where: str | None = None) -> NoReturn:
    """Says a user's mistake in one line on stderr and exits with status 2."""
    sys.stdout.flush()
    print(error_line(what, where), file=sys.stderr, flush=True)
    sys.exit(2)


def describe(err: BaseException) -> str:
    """One readable sentence for an exception (KeyError's quotes and absl's line breaks gone)."""
    inner = err
    while len(inner.args) == 1 and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]  # ml_collections wraps: AttributeError(KeyError(text))
    raw = inner.args[0] if len(inner.args) == 1 and isinstance(inner.args[0], str) else None
    if raw is not None and "Did you mean" in raw:
        # ml_collections: "'batchsize'\nDid you mean "batch_size" instead of "batchsize"?"
        first, _, rest = raw.partition("\n")
        text = f"no config field {first}" + (f"; {rest[:1].lower()}{rest[1:]}" if rest else "")
    elif raw is not None and "Failed loading config file" in raw:
        text = "cannot load the config file: " + raw.strip().splitlines()[-1].strip()
    elif isinstance(inner, KeyError) and raw is not None:
        text = raw
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _where(text: str, argv: Sequence[str]) -> str | None:
    """The command-line arguments a parse error is about: those naming a quoted word of it."""
    args = list(argv[1:])
    names = set(re.findall(r"'([\w.\-/]+)'", text)) | set(re.findall(r'"([\w.\-/]+)"', text))
    hits = [a for a in args if any(n and n in a for n in names)]
    if not hits:
        hits = [a for a in args if a.startswith(("--config", "-config"))]
    return " ".join(hits) or None


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with its failures as one line: an unknown flag, a value of the wrong
    type, a missing required flag, and whatever a --config file raises while loading (its
    argument misspelt, an unknown field overridden, a file that is not there)."""
    return _said_in_one_line(lambda: _parse(argv), argv)


def _parse(argv: Sequence[str]) -> list[str]:
    rest = flags.FLAGS(argv)
    for flag in flags.FLAGS._flags().values():  # noqa: SLF001  (no public list of flags)
        if config_flags.is_config_flag(flag):
            # ml_collections defers a config file's load error to the first attribute
            # access; make it happen here, where it is said as a parse error.
            getattr(flag.value, "to_dict", None)
    return rest


def _said_in_one_line(fn, argv):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001  (config files raise what they like; one line)
        if debug_wanted(argv):
            raise
        # absl's own messages name the flag already ("--config.x ..."); others get where.
        named = isinstance(err, flags.Error) and "--" in str(err)
        fail(describe(err), None if named else _where(str(err), argv))


@contextlib.contextmanager
def user_errors(*types: type[BaseException]):
    """Within: an exception of ``types`` is the user's to fix, said in one line (exit 2)."""
    try:
        yield
    except types as err:
        if debug_wanted():
            raise
        fail(describe(err))


class _QuietLibraries(std_logging.Filter):
    """INFO from the project's own code only; WARNING and above from anyone except the
    expected ones; everything with --verbosity ≥ 1."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if verbose():
            return True
        if record.levelno >= std_logging.WARNING:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001  (a malformed record is shown, not hidden)
                return True
            return not any(s in message for s in EXPECTED_WARNINGS)
        return (record.pathname or "").startswith(_OWN_CODE)


_FILTER = _QuietLibraries()


def verbose() -> bool:
    """True when the user asked for library detail with --verbosity ≥ 1 (-v 1)."""
    try:
        return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
    except (KeyError, flags.UnparsedFlagAccessError):
        return False


def quiet_libraries() -> None:
    """Installs the library filter on every handler of the root logger (absl's included).
    Idempotent; called by ``run`` once flags are parsed."""
    if not verbose():
        for pattern in EXPECTED_PY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    handlers = list(std_logging.getLogger().handlers)
    absl_handler = absl_logging.get_absl_handler()
    if absl_handler not in handlers:
        handlers.append(absl_handler)
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def run(main: Callable[[list[str]], int | None],
        define_flags: Callable[[], None] | None = None,
        user_errors: tuple[type[BaseException], ...] = (),
        keep_host_memory: bool = False) -> None:
    """``absl.app.run(main)`` with one-line errors and quiet libraries.

    ``keep_host_memory``: for command lines that run models; the program starts itself once
    more with glibc's malloc tunables of :mod:`radnet.host_memory` (before anything else, so
    nothing is done twice but the imports).

    Flag-parsing failures and ``app.UsageError`` (a missing required flag) become one line
    and exit 2; so do ``user_errors`` raised by ``main``, besides ``UserError`` and the
    missing-path errors (FileNotFoundError, NotADirectoryError), unless --debug.
    """
    if keep_host_memory:
        try:
            host_memory.restart_with_tunables()
        except ValueError as err:  # a misspelt RADNET_HOST_MEMORY
            fail(describe(err), host_memory.ENV_VAR)
    if define_flags is not None:
        # A config flag with a default file loads it, and applies --config.x overrides from
        # sys.argv, as it is defined: its mistakes show up here.
        _said_in_one_line(define_flags, sys.argv)
    caught = (UserError, FileNotFoundError, NotADirectoryError) + tuple(user_errors)

    def wrapped(argv):
        quiet_libraries()
        try:
            return main(argv)
        except (app.UsageError, *caught) as err:
            if debug_wanted():
                raise
            fail(describe(err))
        except KeyboardInterrupt:
            if debug_wanted():
                raise
            print("radnet: interrupted (every stage resumes where it stopped when run again)",
                  file=sys.stderr, flush=True)
            sys.exit(130)

    app.run(wrapped, flags_parser=parse_flags)
