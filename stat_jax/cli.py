"""What the command-line tools share.

Errors are reported as stat_jax/checks/errors.py says: one line for an
error meant for the user, a traceback for any other.

Flags: each tool defines its flags on its own `flags.FlagValues`, so tools
imported together (as in the tests) cannot clash in absl's global FLAGS.
A tool has `run(args)`, its body once the flags are parsed (args: the
arguments that are not flags), `main(argv)`, which parses the arguments
after the program name in this process (as tests call it), and runs
`cli.run(run, FLAGS)` as `python -m`, which adds absl's own flags (--help,
--helpfull). A tool with a `--config` file flag parses with
`parse_with_config` and runs `cli.run_with_config(main)` instead: its
`--config.x=y` overrides exist only once --config is parsed, on the tool's
own FlagValues.
"""

import sys
from collections.abc import Callable

from absl import app, flags

from stat_jax.checks.errors import (FLAG_ERRORS, flag_error_message,
                                    report_user_errors)


def script_main(program: str, action: Callable[[], int],
                user_errors: tuple = ()) -> Callable[[list[str]], int]:
  """The absl main of train.py / eval.py: no arguments besides flags;
  action()'s exit status, user errors reported (report_user_errors)."""

  def main(argv):
    no_arguments(argv)
    return report_user_errors(program, action, user_errors)

  return main


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """absl's app.run flags_parser for train.py / eval.py: a bad flag or
  `--config.x=y` override is one line '<program>: <message>', exit
  status 1."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except FLAG_ERRORS as error:
      print(f'{program}: {flag_error_message(error)}', file=sys.stderr)
      sys.exit(1)

  return parse


def no_arguments(argv: list[str]) -> None:
  """Refuses arguments other than flags after the program name."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')


def no_positional(args: list[str]) -> None:
  """Refuses arguments other than flags (`args`: those left by parse)."""
  no_arguments(['', *args])


def run_on_videos(program: str, action: Callable[[list[str]], int],
                  videos: list[str]) -> int:
  """The body of a tool over video files (predict, explain): at least one
  video, action(videos)'s exit status, user errors reported."""
  if not videos:
    raise app.UsageError('give one or more video files')
  return report_user_errors(program, lambda: action(videos))


def parse(flag_values: flags.FlagValues, args: list[str]) -> list[str]:
  """The command-line arguments `args` (no program name) parsed afresh by a
  tool's `flag_values` (flags left out take their defaults, whatever an
  earlier call set); the arguments that are not flags. absl stops reading
  flags at '--'."""
  flag_values.unparse_flags()
  try:
    return flag_values(['', *args])[1:]
  except FLAG_ERRORS as error:
    raise app.UsageError(flag_error_message(error)) from error


def run(action: Callable[[list[str]], int],
        flag_values: flags.FlagValues) -> None:
  """`python -m <tool>`: absl's app.run over the tool's flags and absl's;
  `action` gets the arguments that are not flags and returns the exit
  status."""
  flags.FLAGS.append_flag_values(flag_values)  # the same Flag objects
  for flag in flag_values:  # listed by --help, as the main module's
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag_values[flag])

  def main(argv):
    flag_values.mark_as_parsed()  # parsed through absl's FLAGS
    return action(argv[1:])

  app.run(main)


def parse_with_config(flag_values: flags.FlagValues, args: list[str]) -> list[str]:
  """parse() for a tool with a `--config` file flag: ml_collections reads
  the `--config.x=y` overrides from sys.argv, so it holds `args` meanwhile,
  and defines a flag for each, which a second parse would define again."""
  for name in [name for name in flag_values if '.' in name]:
    delattr(flag_values, name)  # the overrides of the last --config parsed
  program, sys.argv = sys.argv, [sys.argv[0], *args]
  try:
    return parse(flag_values, args)
  finally:
    sys.argv = program


def run_with_config(main: Callable[[list[str]], int]) -> None:
  """`python -m <tool>` for a tool with a `--config` file flag: absl's
  app.run, the whole command line handed to the tool's `main(argv)`, which
  parses it (parse_with_config)."""
  app.run(lambda argv: main(argv[1:]),
          flags_parser=lambda argv: flags.FLAGS(argv[:1]) and argv)
