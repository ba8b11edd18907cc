"""The paper's GFLOPs (multiply-adds per view) next to ours.

  python benchmarks/flops_table.py

Rows: Table 1 (attention sets, T = 16), Table 2 (window to, T = 32), and the
per-view cost of Tables 6 / 7 (views x per-view = the papers' totals).
Exits 1 if a row is off by more than 3 %.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import k400, ssv2  # pylint: disable=g-import-not-at-top
from stat_jax.flops import model_macs

TOLERANCE = 0.03


def rows():
  """(label, config, paper GMACs per view)."""
  for attention, paper in (('ca', 58.2), ('ca+sa', 59.0), ('ca+la', 58.4),
                           ('ca+sa+la', 59.1)):
    config = k400.get_config('16')
    config.model.attention = attention
    yield f'Table 1  T=16 {attention}', config, paper
  for window, paper in ((3, 118.6), (5, 120.1), (7, 121.5), (9, 123.0)):
    config = k400.get_config('32')
    config.model.window = window
    yield f'Table 2  T=32 to={window}', config, paper
  for frames, views, total in (('16', 5, 296), ('32', 5, 601), ('64', 9, 2172)):
    yield f'Table 6  K400 {frames}x{views} views', k400.get_config(frames), total / views
  for frames, total in (('16', 178), ('32', 361), ('64', 724)):
    yield f'Table 7  SSv2 {frames}x3 views', ssv2.get_config(frames), total / 3


def main() -> int:
  print(f'{"row":28s} {"paper":>8s} {"ours":>8s} {"diff":>7s}')
  worst = 0.0
  for label, config, paper in rows():
    ours = model_macs(config) / 1e9
    diff = ours / paper - 1
    worst = max(worst, abs(diff))
    print(f'{label:28s} {paper:8.1f} {ours:8.2f} {diff:+7.2%}')
  print(f'largest difference {worst:.2%} (tolerance {TOLERANCE:.0%})')
  return 0 if worst <= TOLERANCE else 1


if __name__ == '__main__':
  sys.exit(main())
