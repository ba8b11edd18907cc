"""The network layout a model config describes: stem convs and STA blocks.

The model (model.py) only reads these specs, so this file is the one place
that turns the paper's prose ("15 STA blocks in 3 stages", Table 5's stems,
MViT-B's adaptive K/V pooling) into numbers.
"""

import dataclasses

import ml_collections

# Paper Table 5: (kernel, stride) of each conv of the token embedding block.
STEM_LAYOUTS = {
    1: (((3, 7, 7), (2, 4, 4)),),
    3: (((3, 3, 3), (2, 2, 2)), ((3, 3, 3), (1, 2, 2)), ((3, 3, 3), (1, 2, 2))),
    5: (((3, 3, 3), (2, 2, 2)), ((3, 3, 3), (1, 2, 2)), ((3, 3, 3), (1, 2, 2)),
        ((3, 3, 3), (2, 2, 2)), ((3, 3, 3), (1, 2, 2))),
}
# MViT-B's stage k works at 1/(4 * 2**k) of the input resolution.
STAGE0_DIVISOR = 4
# The MViT-B stage each stem hands its tokens to: the first one at the stem's
# output resolution (1/4, 1/8, 1/32); the convs replace the transformer
# stages before it ("we replace part of previous transformer blocks with
# convolutional blocks", Table 5).
FIRST_STAGE = {1: 0, 3: 1, 5: 3}


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  kernel: tuple[int, int, int]
  stride: tuple[int, int, int]
  features: int


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  dim: int  # width of the attention (and of the block input)
  dim_out: int  # width after the MLP; 2 * dim at the end of a stage
  heads: int
  q_stride: int  # 2 at the first block of a stage (Q pooling), else 1
  kv_stride: int  # K/V pooling stride for CA
  drop_path: float


def stem_specs(model: ml_collections.ConfigDict) -> tuple[ConvSpec, ...]:
  """Conv layers of the token embedding block for `model.stem_layers`."""
  # Output widths: the calibrated hidden widths (defaults.py), then the
  # width of the first transformer stage.
  hidden = {1: (), 3: tuple(model.stem_hidden), 5: tuple(model.stem5_hidden)}
  if len(hidden[model.stem_layers]) != model.stem_layers - 1:
    key = 'stem_hidden' if model.stem_layers == 3 else 'stem5_hidden'
    raise ValueError(f'model.{key} needs {model.stem_layers - 1} widths, '
                     f'got {hidden[model.stem_layers]}')
  widths = (*hidden[model.stem_layers],
            model.stage_dims[FIRST_STAGE[model.stem_layers]])
  layout = STEM_LAYOUTS[model.stem_layers]
  return tuple(
      ConvSpec(kernel, stride, width)
      for (kernel, stride), width in zip(layout, widths)
  )


def stem_stride(model: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """Total (t, h, w) downsampling of the token embedding block."""
  total = [1, 1, 1]
  for _, stride in STEM_LAYOUTS[model.stem_layers]:
    total = [a * b for a, b in zip(total, stride)]
  return tuple(total)


def token_grid(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(nt, nh, nw) of the tokens the stem produces for the configured input."""
  st, sh, sw = stem_stride(config.model)
  crop = config.data.crop_size
  return config.data.num_frames // st, crop // sh, crop // sw


def block_specs(model: ml_collections.ConfigDict) -> tuple[BlockSpec, ...]:
  """All STA blocks, MViT v1 style.

  The last block of a stage widens through its MLP (dim -> 2 dim, skip via a
  projection); the first block of the next stage pools Q with stride 2 (skip
  via max pooling). K/V pooling keeps MViT-B's adaptive stride: `kv_stride`
  at 1/4 resolution, halved each time the tokens are halved.
  """
  first = FIRST_STAGE[model.stem_layers]
  divisor = stem_stride(model)[1]  # tokens are at 1/divisor of the input
  stages = range(first, len(model.stage_depths))
  depth = sum(model.stage_depths[k] for k in stages)
  specs = []
  for k in stages:
    for j in range(model.stage_depths[k]):
      last_of_stage = j == model.stage_depths[k] - 1 and k + 1 < len(model.stage_depths)
      q_stride = 1
      if j == 0 and k > first and divisor < STAGE0_DIVISOR * 2**k:
        q_stride, divisor = 2, divisor * 2
      specs.append(BlockSpec(
          dim=model.stage_dims[k],
          dim_out=model.stage_dims[k + 1] if last_of_stage else model.stage_dims[k],
          heads=model.stage_heads[k],
          q_stride=q_stride,
          kv_stride=max(1, model.kv_stride * STAGE0_DIVISOR // divisor),
          drop_path=model.drop_path * len(specs) / max(1, depth - 1),
      ))
  return tuple(specs)
