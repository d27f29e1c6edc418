"""What train_jax.py and train_torch.py do alike with their command line: every mistake in it becomes one
`error: ...` line and exit status 1, not a traceback or absl's own report."""
from __future__ import annotations

import sys

from absl import flags

from vdm_common import config as config_lib


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
    flag) as `error: ...` and exit status 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; see --helpshort for the flags", file=sys.stderr)
        sys.exit(1)
