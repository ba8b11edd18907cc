"""What only shows on a mesh of CPU devices (subprocesses): on a data=4
mesh, gradient accumulation splits each device's own clips (no all-gather
or all-to-all of the batch), its gradients equal the whole batch's, and the
one all-reduce of the gradients takes config.grad_reduce_dtype; on 8
devices, an eval batch of 6 views counts every video once. Slow (four
compiles of the tiny model): CI's second step (ci_extra)."""

import pytest

from conftest import run_on_cpu_devices

MESH_SCRIPT = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from configs import tiny
from stat_jax import optim, sharding
from stat_jax.train_state import abstract_train_state, init_train_state, with_shardings
from stat_jax.train_step import abstract_batch, jit_train_step
from tests.training_testlib import fixed_batch, no_randomness

def step_for(accum, reduce_dtype='float32', dtype='float32'):
  config = no_randomness(tiny.get_config())
  config.batch_size, config.grad_accum_steps = 8, accum
  config.grad_reduce_dtype, config.dtype = reduce_dtype, dtype
  mesh = sharding.make_mesh(config)
  parts, tx, abstract, shardings = abstract_train_state(config, mesh)
  step = jit_train_step(config, parts, tx, mesh, shardings)
  lowered = step.lower(with_shardings(abstract, shardings), abstract_batch(config))
  state = jax.jit(lambda: init_train_state(parts, 0, tx), out_shardings=shardings)()
  return config, mesh, lowered, state

found = {}
results = {}
for accum in (1, 2):
  config, mesh, lowered, state = step_for(accum)
  compiled = lowered.compile()
  hlo = compiled.as_text()
  found[f'accum{accum}'] = sorted({op for op in re.findall(
      r'(all-gather|all-to-all|collective-permute|reduce-scatter)', hlo)})
  batch = sharding.global_batch(fixed_batch(config), mesh)
  new_state, metrics = compiled(state, batch)
  results[accum] = (float(metrics['loss']), float(metrics['grad_norm']),
                    [np.asarray(x).tolist() for x in jax.tree.leaves(new_state.opt_state)[:4]])
found['loss'] = [results[1][0], results[2][0]]
found['grad_norm'] = [results[1][1], results[2][1]]
found['moments_close'] = all(np.allclose(a, b, rtol=1e-4, atol=1e-7)
                             for a, b in zip(results[1][2], results[2][2]))
# The reduction over the devices, before XLA makes it an all-reduce (XLA:CPU
# then computes every all-reduce in float32).
for reduce_dtype in ('float32', 'bfloat16'):
  text = step_for(1, reduce_dtype, 'bfloat16')[2].as_text()
  found[reduce_dtype] = sorted(set(re.findall(
      r'stablehlo.reduce\\(.*?across dimensions = \\[0\\] : \\(tensor<4x[^>]*x(bf16|f32)>', text)))
print(json.dumps(found))
"""


@pytest.mark.ci_extra
def test_accumulation_on_a_mesh_keeps_each_devices_rows():
  found = run_on_cpu_devices(MESH_SCRIPT, 4)
  assert found['accum1'] == found['accum2'] == []  # no clip moves
  assert found['loss'][0] == pytest.approx(found['loss'][1], rel=1e-5)
  assert found['grad_norm'][0] == pytest.approx(found['grad_norm'][1],
                                                rel=1e-4)
  assert found['moments_close']
  assert found['float32'] == ['f32'] and found['bfloat16'] == ['bf16']


EVAL_SCRIPT = """
import json
import jax
from configs import tiny
from stat_jax import sharding, trainer
from stat_jax.train_state import ModelParts
from stat_jax.train_step import make_eval_step
config = tiny.get_config()
config.data.eval_spec, config.data.label_map = %r, %r
config.data.eval_batch_size = 3  # x 2 views = 6 rows, padded to 8 devices' 8
parts = ModelParts(config)
params = jax.jit(lambda: parts.init_params(0))()
mesh = sharding.make_mesh(config)
result = trainer.evaluate(config, jax.jit(make_eval_step(parts, config.data)),
                          params, mesh)
print(json.dumps({key: result[key] for key in ('num_videos', 'num_views',
                                               'skipped')}))
"""


@pytest.mark.ci_extra
def test_an_eval_batch_that_does_not_divide_the_devices_counts_all(motion):
  found = run_on_cpu_devices(
      EVAL_SCRIPT % (motion['val'], motion['label_map']), 8)
  assert found == {'num_videos': 7, 'num_views': 14, 'skipped': 0}
