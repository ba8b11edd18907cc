"""Evaluate STAT: python eval.py --config=configs/k400.py:16 --workdir=DIR."""

import sys


def main() -> int:
  print('eval.py: multi-view evaluation is not implemented yet (issue 5); '
        'nothing was evaluated.', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main())
