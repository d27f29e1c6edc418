"""The one base class of the errors a user can fix: bad config values, data files, checkpoints, conversions,
arguments. The entry scripts (train_jax.py, train_torch.py, convert.py) catch it once, print `error: ...`
and exit with status 1; everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Input the project cannot use; the message says what is wrong, where, and what to do."""
