"""The reference config: every key an experiment config may set, with the
paper's defaults (the STAT architecture, the data recipe, the training
recipe). Each experiment file in configs/ starts from `base_config()` and
changes what differs; checks/config.py refuses any key not defined here.

The paper leaves some widths open; the values marked CALIBRATED below were
chosen so that the multiply-adds per view reproduce the paper's Tables 1, 2,
6 and 7 (see benchmarks/flops_table.py and the README).
"""

import ml_collections

# MViT-B (Fan et al. 2021) has 4 stages [1, 2, 11, 2] with widths
# 96/192/384/768 and 1/2/4/8 heads. STAT's 3-layer conv stem replaces the
# first stage (paper: "15 STA blocks in 3 stages", nc = 192 after the stem);
# the 1-layer stem of Table 5 keeps it, the 5-layer stem replaces two stages.
MVIT_B_DEPTHS = (1, 2, 11, 2)
MVIT_B_DIMS = (96, 192, 384, 768)
MVIT_B_HEADS = (1, 2, 4, 8)

# Widths of the first four convs of Table 5's 5-layer stem (model.stem5_hidden).
STEM5_HIDDEN = (144, 256, 512, 512)

# Paper Table 6 / section "Effect of Window Size": to = 3, 5, 7 for T = 16, 32, 64.
WINDOW_FOR_FRAMES = {16: 3, 32: 5, 64: 7}

# Kinetics mean/std in [0, 1] pixel units (SlowFast / MViT recipe).
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


def clip_length(arg: str, config_file: str) -> int:
  """The T of a `configs/<file>.py:<T>` argument: one of the paper's 16, 32, 64."""
  if not arg.isdigit() or int(arg) not in WINDOW_FOR_FRAMES:
    raise ValueError(f'{config_file}:{arg}: the clip length must be one of '
                     f'{sorted(WINDOW_FOR_FRAMES)}')
  return int(arg)


def model_config(num_classes: int, window: int) -> ml_collections.ConfigDict:
  """The STAT architecture of the paper (defaults = its main setting)."""
  m = ml_collections.ConfigDict()
  m.num_classes = num_classes
  # 'stat', or 'mvit': MViT-B v1 (Fan et al. 2021), the paper's baseline
  # (stat_jax/mvit.py, configs/mvit_b.py). MViT reads the stage, pooling,
  # MLP and stem keys below (stem_layers = 1: its patch embedding); the
  # STA keys (attention, window, spatial_summary, lta, sa_pool) are STAT's.
  m.arch = 'stat'
  # Table 1: which key sets each query attends.
  m.attention = 'ca+sa+la'  # one of ca, ca+sa, ca+la, ca+sa+la
  # Table 2: short-term window `to` (odd); frame i sees to-1 neighbours.
  m.window = window
  # Table 3: global spatial embedding used by LA and the classifier.
  m.spatial_summary = 'cls'  # 'cls' (spatial class token) or 'avgpool'
  # Table 4: temporal aggregation layers (0 = mean of the frame summaries).
  m.lta = 1
  # Each lta layer is pre-LN multi-head self-attention with a residual, no
  # MLP (the paper's "light temporal aggregation block ... lta Multi-Headed
  # Self Attention layers"). True adds a transformer MLP (hidden
  # mlp_ratio x width) to each: +4.7 M parameters per layer at width 768.
  m.lta_mlp = False
  # Table 5: conv layers in the token embedding block (1, 3 or 5).
  m.stem_layers = 3
  # CALIBRATED: hidden widths of the 3-layer stem (the paper gives only the
  # output width 192). 64 -> 96 -> 192 gives 58.2 GMACs for the CA row of
  # Table 1.
  m.stem_hidden = (64, 96)
  # CALIBRATED: the first four widths of the 5-layer stem of Table 5; its
  # fifth conv outputs the width of the stage it hands its tokens to. Every
  # stem hands over to the MViT-B stage of its output resolution (arch.py):
  # the 1-layer stem (1/4) keeps all 16 blocks, the 3-layer (1/8) replaces
  # the first stage (1 block), the 5-layer (1/32, T/4) the first three (14
  # blocks) and feeds the last two (768 wide). The paper keeps "computational
  # overhead and numbers of parameters approximately the same" across the
  # stems: 144 -> 256 -> 512 -> 512 -> 768 puts the 5-layer stem within 1 %
  # of the 3-layer one in both at T = 16 (benchmarks/flops_table.py, Table 5).
  m.stem5_hidden = STEM5_HIDDEN
  m.stage_depths = MVIT_B_DEPTHS
  m.stage_dims = MVIT_B_DIMS
  m.stage_heads = MVIT_B_HEADS
  # K/V pooling (CA): depthwise conv, kernel 3x3, stride kv_stride at 1/4 of
  # the input resolution, halved at each Q pooling (MViT-B's adaptive
  # [1, 8, 8] stride). For 224² K_CA, V_CA are 7x7 per frame in every block
  # except the two Q-pooling transition blocks: their K/V are pooled from
  # the block input (28x28, then 14x14) with the already halved stride, so
  # 14x14 there (as in MViT-B).
  m.kv_stride = 8
  m.pool_kernel = 3
  # CALIBRATED: SA = 2D average pool of K_CA / V_CA with this window and
  # stride ('SAME' padding): 7x7 -> 4x4 tokens per neighbouring frame
  # (14x14 -> 7x7 at the two transition blocks). It
  # reproduces Table 2's slope (+1.5 GMACs per +2 in `to` at T = 32).
  m.sa_pool = 2
  m.mlp_ratio = 4.0
  m.qkv_bias = True
  # How STA's attention is computed (same numbers, attention.py): 'xla' maps
  # the per-frame attention over frames; 'cudnn' packs the frames for cuDNN
  # flash attention (GPU, bfloat16/float16); 'pallas' runs fused Pallas
  # kernels (TPU; interpreted, slowly, elsewhere); 'auto' is 'pallas' for
  # STAT on a TPU, else 'xla', which runs on every backend and dtype.
  m.attention_impl = 'auto'
  # How the convolutions are computed (same numbers, stat_jax/conv.py): 'cpu'
  # rewrites them into forms XLA:CPU runs fast, 'xla' leaves them to XLA
  # (cuDNN on a GPU); 'auto' is 'cpu' on the CPU backend, else 'xla'.
  m.conv_impl = 'auto'
  # How STA splits the heads off its projections (same numbers, to
  # rounding; attention.split_heads): 'products' lays them out in three
  # matmuls, 'fused_product' in one, 'transposed' transposes the projected
  # tokens; 'auto' is 'products' on a TPU, 'fused_product' on a GPU,
  # 'transposed' on the CPU.
  m.head_layout = 'auto'
  # How the STA blocks' MLPs of width <= 384 compute LN -> fc1 -> GELU ->
  # fc2 + skip (same numbers, stat_jax/kernels/mlp.py): 'xla' leaves it to
  # XLA; 'pallas' is one fused Pallas kernel that keeps the 4C hidden
  # activations on chip (TPU; interpreted, slowly, on the CPU; refused on
  # a GPU); 'auto' is 'pallas' on TPUs, else 'xla'.
  m.mlp_impl = 'auto'
  m.drop_path = 0.2  # stochastic depth, rising linearly over the blocks
  m.dropout = 0.5  # before the classifier
  return m


def data_config(num_frames: int) -> ml_collections.ConfigDict:
  """The input pipeline (MViT recipe; docs/design.md#data)."""
  d = ml_collections.ConfigDict()
  d.dataset = 'kinetics400'
  d.train_spec = ''  # shard spec: 'prefix@N', glob, or comma-separated list
  d.eval_spec = ''
  d.label_map = ''  # '' = label_map.txt beside the shards
  d.num_frames = num_frames  # T
  d.sampling = 'segment'  # 'segment' (one random frame per segment) or 'dense'
  d.frame_stride = 4  # dense sampling stride
  d.crop_size = 224
  d.eval_short_side = 224  # eval: resize short side, then take crops
  d.area_range = (0.08, 1.0)  # inception-style random resized crop
  d.aspect_range = (3 / 4, 4 / 3)
  # The augmentation after the crop (flip, RandAugment, normalisation,
  # random erasing) runs on the device, in the train step.
  d.flip = True
  d.randaugment_layers = 4  # RandAugment m7-n4-mstd0.5; 0 disables
  d.randaugment_magnitude = 7.0
  d.randaugment_magnitude_std = 0.5
  d.random_erasing = 0.25
  # Repeated augmentation (MViT's AUG.NUM_SAMPLE): each train video is
  # decoded once and gives this many differently augmented clips, side by
  # side in the batch (batch_size counts clips, and must be divisible by
  # it); an epoch still reads each video once. 1 = off.
  d.repeated_augment = 1
  d.mean = KINETICS_MEAN
  d.std = KINETICS_STD
  d.num_clips = 5  # eval views: clips x crops
  d.num_crops = 1
  d.eval_batch_size = 8  # global, in videos
  d.num_parallel_calls = -1  # tf.data.AUTOTUNE
  # Train records in a row that give no clip (unreadable, unlabelled, or
  # frames that do not decode) before the run stops naming the shards; a
  # whole epoch of them stops it in any case.
  d.max_consecutive_skips = 1000
  # Warn when more than this fraction of the train records read since the
  # previous progress line were skipped.
  d.skip_warning_fraction = 0.05
  # Resume even though the train shards differ from the checkpoint's
  # (records added or removed: the data order changes).
  d.allow_data_change = False
  # Evaluation of temporal order, for datasets whose classes come in
  # time-reversed pairs: entry c is the class a clip of class c becomes when
  # played backwards. Set, every eval also scores the val clips played
  # backwards against it ('time_reversed_top1'). () = off.
  d.reversed_classes = ()
  # The synthetic motion dataset (stat_jax/data/synthetic.py): with generate=True the
  # specs above are filled in, and the set generated into `dir` if absent.
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.generate = False
  d.synthetic.dir = 'cache/synthetic_motion'
  d.synthetic.train_clips = 2400
  d.synthetic.val_clips = 480
  d.synthetic.frames = 32
  d.synthetic.size = 64
  d.synthetic.seed = 0
  return d


def clip_shape(data: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """(T, H, W, 3) of one clip of the data config, as the model takes it."""
  return (data.num_frames, data.crop_size, data.crop_size, 3)


def base_config(num_frames: int, num_classes: int) -> ml_collections.ConfigDict:
  """Model + data + the MViT training recipe (AdamW, warmup + cosine)."""
  c = ml_collections.ConfigDict()
  c.model = model_config(num_classes, WINDOW_FOR_FRAMES.get(num_frames, 3))
  c.data = data_config(num_frames)

  c.seed = 0
  c.batch_size = 64  # global, in clips
  c.total_steps = 0  # 0 = derive from num_epochs
  c.num_epochs = 200
  c.train_examples = 240_000  # train videos; with num_epochs: total_steps
  c.grad_accum_steps = 1
  # Compute dtype; params are always float32. 'auto' is bfloat16 on TPUs and
  # GPUs, float32 on the CPU (model.resolve_dtype).
  c.dtype = 'float32'
  # The dtype of the one all-reduce of the gradients over the devices (each
  # computes its own clips' gradients, train_step.py): 'float32' sums them
  # exactly enough at any device count; 'bfloat16' sends half the bytes
  # (benchmarks.aot reports both) with 8 mantissa bits per partial sum.
  # Unused on one device.
  c.grad_reduce_dtype = 'float32'
  c.remat = False  # rematerialise each STA block in the backward pass

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 1.6e-3  # at batch 512, scaled by batch_size / 512
  c.optimizer.min_lr = 1.6e-5
  c.optimizer.warmup_epochs = 30.0
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.grad_clip = 1.0

  # Each clip is mixed with a clip of another video (never itself nor a
  # repeated-augment twin): on its own device while each device holds 2
  # videos or more, else with the same row of the next video's device, one
  # collective permute of the clips per step (stat_jax/mixup.py).
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.label_smoothing = 0.1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all devices not used by fsdp
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**14  # smaller parameters stay replicated
  # TPU slices of a multi-slice job (their devices joined over the data
  # center network): "data" is split across them, fsdp stays inside each
  # (stat_jax/sharding.py). On CPUs and GPUs each process counts as a slice.
  c.mesh.slices = 1

  c.log_every = 50
  c.eval_every = 5000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  # Val clips whose frame-to-frame attention maps TensorBoard shows at each
  # evaluation (stat_jax/eval_images.py); 0: none.
  c.attention_images = 4
  # Workdir or checkpoint dir of another run to start from (an MViT-B run
  # or import warm-starts STAT by role: stat_jax/transfer.py).
  c.init_from = ''
  # jax's persistent compilation cache: a restart loads the compiled train
  # and eval steps from here (a gs:// path works too); '' = off
  # (stat_jax/compile_cache.py).
  c.compilation_cache_dir = '~/.cache/stat_jax/xla'
  # (start, count): a jax.profiler trace of steps start .. start+count-1
  # into workdir/tensorboard, for TensorBoard's profile plugin
  # (stat_jax/profiling.py); (0, 0) = off.
  c.profile_steps = (0, 0)
  # Resume even though the model / data / recipe keys differ from the
  # checkpoint's config (stat_jax/checks/workdir.py lists the keys that may
  # always differ); False refuses, naming the keys.
  c.resume_with_changed_config = False
  return c


def flat_keys(tree, prefix: str = '') -> dict:
  """{dotted key: value} of a config, or of the nested dicts a saved config
  reads back as."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flat_keys(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
