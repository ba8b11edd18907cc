"""The one exception type for inputs a user must fix."""


class UserError(ValueError):
  """A config, data set, run directory or command line that cannot be used,
  raised on purpose with a message that says what to change. Command-line
  tools print it as one line; any other exception is a bug and keeps its
  traceback. (A ValueError, so code that catches those still does.)"""
