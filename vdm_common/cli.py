"""What train_jax.py and train_torch.py do alike with their command line: every mistake in it becomes one
`error: ...` line and exit status 1, not a traceback or absl's own report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags

from vdm_common import config as config_lib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# absl's help flags (--help, -?, ...): they print the help, then exit with status 1 where a help exits with 0.
HELP_FLAGS = ("help", "?", "helpshort", "helpfull", "helpxml")


def check_config_overrides(argv: list[str]) -> None:
    """Exits with `error: ...` when a --config.section.field=value names a field the schema lacks.

    Call before defining the config flag: ml_collections reads these overrides while the flag is defined and
    raises a bare KeyError (a traceback) for an unknown field.
    """
    try:
        config_lib.check_override_names(arg[len("--config."):].split("=")[0] for arg in argv[1:]
                                        if arg.startswith("--config."))
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's flags_parser), with its errors (a value of the wrong type, an unknown
    flag) and a --config file that cannot be read as `error: ...` and exit status 1; --help exits with 0."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; see --helpshort for the flags", file=sys.stderr)
        sys.exit(1)
    except SystemExit as e:
        if e.code == 1 and _asks_for_help(argv):
            sys.exit(0)
        raise
    _check_config_file()
    return rest


def _asks_for_help(argv: list[str]) -> bool:
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return any(arg.startswith("-") and arg.lstrip("-").split("=")[0] in HELP_FLAGS for arg in args)


def _check_config_file() -> None:
    """Exits with `error: --config=PATH: ...` when the config flag could not load its file: ml_collections
    keeps the failure (a missing file, one it cannot import) for the first use of the config."""
    if "config" not in flags.FLAGS or not flags.FLAGS["config"].present:
        return
    from ml_collections import config_flags

    given = config_flags.get_config_filename(flags.FLAGS["config"])
    path = given.split(":", 1)[0]          # 'file.py:argument' passes the argument to get_config
    if not os.path.isfile(path):
        shown = os.path.relpath(CONFIGS)
        shown = str(CONFIGS) if shown.startswith("..") else shown
        names = ", ".join(sorted(p.name for p in CONFIGS.glob("*.py") if p.name != "__init__.py"))
        print(f"error: --config={given}: no such file; the configs are {shown}/*.py ({names})", file=sys.stderr)
        sys.exit(1)
    try:
        flags.FLAGS.config.get("model")     # ml_collections' placeholder raises the load's error here
    except (IOError, OSError) as e:
        print(f"error: --config={given}: {e}; pass one of configs/*.py", file=sys.stderr)
        sys.exit(1)
