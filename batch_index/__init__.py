"""The bulk-index job (Ray Data). Its first act: name missing packages and the fix."""

from batch_index.environment import check as _check_environment

_check_environment()
