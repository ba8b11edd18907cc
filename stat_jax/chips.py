"""Published figures of the accelerators this repo reports against: dense
bf16 peak FLOP/s, memory, memory bandwidth and, for TPUs, inter-chip
(ICI) bandwidth. Training (MFU in the progress line), the roofline and the
ahead-of-time slice compile (benchmarks/) all read this one table.
"""

import dataclasses

import jax

GB, GiB = 10**9, 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  bf16_flops: float  # dense peak, FLOP/s
  hbm_bytes: float | None = None
  hbm_bandwidth: float | None = None  # bytes/s
  # One direction, bytes/s per chip: what an all-gather or a reduce-scatter
  # can move into a chip (half the "bidirectional" figure of the TPU pages).
  ici_bandwidth: float | None = None


# By `device_kind` substring, the more specific names first ('TPU v5 lite'
# before 'TPU v5'). Sources:
#   GPUs: NVIDIA datasheets (SXM parts).
#   TPU v4: cloud.google.com/tpu/docs/v4 (275 TFLOPs, 32 GiB at 1200 GBps;
#     no per-chip ICI figure there: its all-reduce bandwidth per Pod,
#     1.1 PB/s, over the 4096 chips).
#   TPU v5e: cloud.google.com/tpu/docs/v5e (197 TFLOPs, 16 GB at 819 GBps,
#     bidirectional ICI 400 GBps per chip).
#   TPU v5p: cloud.google.com/tpu/docs/v5p (459 TFLOPs, 95 GiB at 2765 GBps,
#     bidirectional ICI 1200 GBps per chip).
#   TPU v6e: cloud.google.com/tpu/docs/v6e (918 TFLOPs, 32 GB at 1640 GBps,
#     bidirectional ICI 800 GBps per chip).
CHIPS = {
    'H200': Chip(989e12, 141 * GB, 4800 * GB),
    'H100': Chip(989e12, 80 * GiB, 3350 * GB),
    'A100': Chip(312e12),
    'L4': Chip(121e12),
    'TPU v6 lite': Chip(918e12, 32 * GB, 1640 * GB, 400 * GB),
    'TPU v5 lite': Chip(197e12, 16 * GB, 819 * GB, 200 * GB),
    'TPU v5': Chip(459e12, 95 * GiB, 2765 * GB, 600 * GB),  # v5p
    'TPU v4': Chip(275e12, 32 * GiB, 1200 * GB, 1.1e15 / 4096),
}


def chip(device: jax.Device) -> Chip | None:
  """The figures of `device`'s kind, or None where unknown (e.g. CPUs)."""
  kind = device.device_kind.lower()
  for name, figures in CHIPS.items():
    if name.lower() in kind:
      return figures
  return None
