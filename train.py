"""Train STAT: python train.py --config=configs/k400.py:16 --workdir=DIR."""

import sys


def main() -> int:
  print('train.py: the training loop is not implemented yet (issue 5); '
        'nothing was trained.', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main())
