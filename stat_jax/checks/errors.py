"""The one exception type for inputs a user must fix, and how a tool
reports it: one line '<program>: <message>', exit status 1. Any other
exception is a bug and keeps its traceback.

This module is the bottom of the import graph: the input layer
(stat_jax/data/) raises UserError too, so it imports nothing of stat_jax.
"""

import ast
import sys
from collections.abc import Callable

from absl import flags


class UserError(ValueError):
  """A config, data set, run directory or command line that cannot be used,
  raised on purpose with a message that says what to change. Command-line
  tools print it as one line; any other exception is a bug and keeps its
  traceback. (A ValueError, so code that catches those still does.)"""


USER_ERRORS = (UserError, FileNotFoundError)


def report_user_errors(program: str, action: Callable[[], int],
                       user_errors: tuple = ()) -> int:
  """action()'s exit status; an error of USER_ERRORS or `user_errors`
  printed as '<program>: <message>', exit status 1."""
  try:
    return action()
  except (*USER_ERRORS, *user_errors) as error:
    print(f'{program}: {error}', file=sys.stderr)
    return 1


# What parsing flags raises for a bad flag, or a bad `--config.x=y` override
# (ml_collections: an unknown key, a value of the wrong type).
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def flag_error_message(error: Exception) -> str:
  """One line for an error of FLAG_ERRORS (absl gives a traceback for an
  unknown config key)."""
  if isinstance(error, flags.Error):
    return str(error)
  text = str(error.args[0]) if error.args else str(error)
  if text[:1] in ('"', "'"):  # ml_collections gives a repr
    try:
      text = str(ast.literal_eval(text))
    except (SyntaxError, ValueError):
      pass
  kind = ('unknown config key ' if isinstance(error, AttributeError)
          else 'bad --config override: ')
  return kind + ' '.join(text.split())
