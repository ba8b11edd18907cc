"""benchmarks/aot.py: the train step compiled ahead of time for a slice.

On 8 fake CPU devices (one subprocess, both meshes): what the (data=2,
fsdp=4) and (data=8, fsdp=1) programs hold in memory and which collectives
they run, against the tiny model's parameters and the HLO text read here.
Bad input (an unknown topology, a batch the mesh cannot split, no libtpu)
is one line. Where libtpu is installed (`pip install "jax[tpu]"`, see
docs/scale-out.md), the tiny config is compiled for a TPU v5e:2x2 slice.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from benchmarks import aot
from configs import tiny
from conftest import FAST_COMPILE, ROOT
from stat_jax import flops
from stat_jax.train_state import ModelParts

CPU_ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
               XLA_FLAGS=f'{FAST_COMPILE} --xla_force_host_platform_device_count=8')
TINY = '--config=configs/tiny.py'
FSDP_MIN_SIZE = 2**14  # tiny's config.mesh.fsdp_min_size (the default)

EIGHT_DEVICES = f'''
import sys
from benchmarks import aot
# A --config.x override can be parsed once per process (config_flags).
for mesh in (['--config.mesh.fsdp=4', f'--hlo_out={{sys.argv[1]}}'], []):
  assert aot.main(['{TINY}', '--topology=cpu', '--batch_per_chip=1', *mesh,
                   '--json']) == 0  # the default mesh: fsdp=1
sys.exit(aot.main(['{TINY}', '--topology=cpu', '--config.batch_size=12']))
'''
# An all-gather with one array result, as XLA prints it: (dtype, dims).
ALL_GATHER = re.compile(r'= (f32|bf16)\[([\d,]+)\]\S* all-gather\(')


def parameter_shapes() -> list[tuple[int, ...]]:
  return [p.shape for p in
          jax.tree.leaves(ModelParts(tiny.get_config()).abstract_params)]


def sharded_by_fsdp4(shape) -> bool:
  """stat_jax/sharding.py's rule, restated: big enough, 4 divides a dim."""
  return math.prod(shape) >= FSDP_MIN_SIZE and any(d % 4 == 0 for d in shape)


def float32_bytes(shapes) -> int:
  return sum(4 * math.prod(s) for s in shapes)


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """{'fsdp': report, 'data': report, 'hlo': the fsdp program's HLO text,
  'stderr': ...}: the JSON reports of the two meshes, and what a batch of
  12 on the 8 devices printed."""
  hlo = str(tmp_path_factory.mktemp('aot') / 'fsdp.hlo')
  result = subprocess.run([sys.executable, '-c', EIGHT_DEVICES, hlo],
                          cwd=ROOT, env=CPU_ENV, capture_output=True,
                          text=True, timeout=300, check=False)
  reports = [json.loads(line) for line in result.stdout.splitlines()
             if line.startswith('{')]
  assert result.returncode == 1 and len(reports) == 2, result.stderr[-3000:]
  with open(hlo) as f:
    return {'fsdp': reports[0], 'data': reports[1], 'hlo': f.read(),
            'stderr': result.stderr}


def test_the_fsdp_program_all_gathers_sharded_parameters(eight_devices):
  report = eight_devices['fsdp']
  assert report['mesh'] == {'data': 2, 'fsdp': 4}
  assert report['chips'] == 8 and report['batch'] == 8
  gathered = [tuple(int(d) for d in dims.split(','))
              for _, dims in ALL_GATHER.findall(eight_devices['hlo'])]
  # Counted off the HLO text: every all-gather, its float32 result.
  assert report['collectives']['all-gather']['count'] == len(gathered) > 0
  assert report['collectives']['all-gather']['bytes'] == float32_bytes(gathered)
  # Some are weights fsdp=4 shards, gathered whole. (Where a matmul's
  # activations are smaller than its weight, XLA gathers those instead.)
  sharded = {s for s in parameter_shapes() if sharded_by_fsdp4(s)}
  assert sharded & set(gathered)


def test_the_data_parallel_program_all_reduces_the_gradients_only(eight_devices):
  report = eight_devices['data']
  assert report['mesh'] == {'data': 8, 'fsdp': 1}
  assert report['collectives']['all-gather']['count'] == 0
  assert report['collectives']['reduce-scatter']['count'] == 0
  # Every gradient once (float32), plus a few scalars (loss, norms).
  total = float32_bytes(parameter_shapes())
  assert total <= report['collectives']['all-reduce']['bytes'] <= 1.01 * total


def test_fsdp_keeps_a_quarter_of_the_sharded_state_per_device(eight_devices):
  """Parameters and both AdamW moments: 3 float32 copies, replicated at
  fsdp=1; at fsdp=4 each device holds a quarter of the sharded ones."""
  shapes = parameter_shapes()
  sharded = float32_bytes(s for s in shapes if sharded_by_fsdp4(s))
  replicated = eight_devices['data']['argument_bytes']
  assert replicated >= 3 * float32_bytes(shapes)
  saved = replicated - eight_devices['fsdp']['argument_bytes']
  assert saved == pytest.approx(3 * sharded * 3 / 4, rel=0.01)
  for mesh in ('fsdp', 'data'):  # no chip figures for CPUs
    report = eight_devices[mesh]
    assert report['hbm_bytes'] is None and report['fits'] is None
    assert report['est_mfu'] is None and report['bytes_per_chip'] > 0


def test_a_batch_the_mesh_cannot_split_is_one_line(eight_devices):
  (line,) = [l for l in eight_devices['stderr'].splitlines()
             if l.startswith('benchmarks.aot:')]
  assert 'batch_size=12' in line and 'a multiple of 8' in line


def run_tool(args, capsys) -> tuple[int, list[str]]:
  """aot.main's exit status and its stderr lines."""
  status = aot.main(args)
  return status, capsys.readouterr().err.strip().splitlines()


def test_an_unknown_topology_is_one_line(capsys):
  status, lines = run_tool([TINY, '--topology=v9z:2x2'], capsys)
  assert status == 1 and len(lines) == 1
  assert "unknown topology 'v9z:2x2'" in lines[0] and 'v5p:4x4x8' in lines[0]


def test_slices_of_cpu_devices_are_one_line(capsys):
  status, lines = run_tool([TINY, '--topology=cpu', '--num_slices=2'], capsys)
  assert status == 1 and len(lines) == 1
  assert '--num_slices=2 needs a TPU topology' in lines[0]


def test_a_tpu_topology_without_libtpu_says_what_to_install(capsys, monkeypatch):
  monkeypatch.setattr(aot, 'libtpu_installed', lambda: False)
  status, lines = run_tool([TINY, '--topology=v5e:2x2'], capsys)
  assert status == 1 and len(lines) == 1
  assert 'needs libtpu' in lines[0] and 'pip install "jax[tpu]' in lines[0]


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu not installed (pip install "jax[tpu]")')
def test_the_tiny_config_compiles_for_a_v5e_slice():
  """A real TPU compile (about a minute): 4 chips of 16 GB, data parallel;
  a shape libtpu does not know is one line."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.aot', TINY, '--topology=v5e:2x2',
       '--batch_per_chip=2', '--json'], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report['device_kind'] == 'TPU v5 lite' and report['chips'] == 4
  assert report['fits'] and 0 < report['bytes_per_chip'] < 16e9
  assert 0 < report['est_step_s'] < 1 and 0 < report['est_mfu'] < 1
  # The gradients, all-reduced (XLA:TPU leaves out 63 float32 values).
  total = float32_bytes(parameter_shapes())
  assert 0.99 * total <= report['collectives']['all-reduce']['bytes'] <= 1.01 * total
  bad = subprocess.run(
      [sys.executable, '-m', 'benchmarks.aot', TINY, '--topology=v5p:3x3x3'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert "benchmarks.aot: unknown topology 'v5p:3x3x3'" in bad.stderr


# The reduction of the hand-written all-reduces below.
ADD_COMPUTATION = '''%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}
'''


class FakeCompiled:
  """What slice_report reads of a compiled program, set by hand: 1 GiB of
  temporaries, an all-reduce of 1000 float32 values, a Pallas kernel that
  declares 6 GFLOP and 2 GB, an optimizer fusion, a step estimate."""

  def __init__(self, optimal_seconds):
    self.optimal_seconds = optimal_seconds

  def memory_analysis(self):
    return types.SimpleNamespace(
        argument_size_in_bytes=0, output_size_in_bytes=0, alias_size_in_bytes=0,
        temp_size_in_bytes=2**30, peak_memory_in_bytes=0)

  def cost_analysis(self):
    return {'optimal_seconds': self.optimal_seconds, 'bytes accessed': 4e9,
            'flops': 7e9}

  def as_text(self):
    return '''HloModule fake
''' + ADD_COMPUTATION + '''%scale (x: f32[1000]) -> f32[1000] {
  %x = f32[1000]{0} parameter(0)
  ROOT %negated = f32[1000]{0} negate(%x)
}
ENTRY %main (p: f32[1000]) -> f32[1000] {
  %p = f32[1000]{0} parameter(0)
  %all-reduce = f32[1000]{0} all-reduce(%p), to_apply=%add
  %fused_mlp_forward.1 = f32[1000]{0} custom-call(%all-reduce), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/jvp(STAT)/fused_mlp_forward/pallas_call"}, backend_config={"custom_call_config":{"body":"TUzv","cost_estimate":{"flops":"6000000000","transcendentals":"0","bytes_accessed":"2000000000"}}}
  ROOT %update = f32[1000]{0} fusion(%fused_mlp_forward.1), kind=kLoop, calls=%scale, metadata={op_name="jit(step)/optimizer/neg"}
}
'''


def fake_v5e_slice(chips: int):
  """A mesh-like object of `chips` TPU v5e chips (197 TFLOP/s bf16, 16 GB,
  200 GB/s of ICI one way: cloud.google.com/tpu/docs/v5e)."""
  chip = types.SimpleNamespace(device_kind='TPU v5 lite', platform='tpu',
                               slice_index=0)
  return types.SimpleNamespace(devices=np.array([chip] * chips), size=chips,
                               shape={'data': chips, 'fsdp': 1})


def test_the_estimate_gives_mfu_clips_per_s_and_ici_time_by_hand():
  config = tiny.get_config()
  config.batch_size = 8
  report = aot.slice_report(config, FakeCompiled(0.01), 1.0, fake_v5e_slice(4))
  step_flops = 8 * 3 * 2 * flops.model_macs(config)  # 8 clips, 3 passes
  assert report['est_mfu'] == pytest.approx(step_flops / (0.01 * 4 * 197e12))
  assert report['est_clips_per_s'] == pytest.approx(800)
  assert report['bytes_per_chip'] == 2**30 and report['fits']
  assert report['bytes_per_clip'] == 4e9 * 4 / 8
  all_reduce = report['collectives']['all-reduce']
  assert all_reduce['count'] == 1 and all_reduce['bytes'] == 4000
  assert all_reduce['seconds'] == pytest.approx(2 * 4000 / 200e9)


def test_program_flops_phases_and_pallas_kernels_by_hand():
  """The Pallas kernel counts what it declares, not its 8 KB of operands
  (2 GB at v5e's 819 GB/s: 2.44 ms, longer than 6 GFLOP at 197 TFLOP/s);
  the optimizer's fusion and the all-reduce move 4 KB in and 4 KB out."""
  config = tiny.get_config()
  config.batch_size = 8
  report = aot.slice_report(config, FakeCompiled(0.01), 1.0, fake_v5e_slice(4))
  assert report['program_flops'] == 7e9
  assert report['model_flops'] == 2 * 3 * 2 * flops.model_macs(config)  # 2 clips
  assert report['bytes_floor_s'] == pytest.approx(4e9 / 819e9)
  assert report['kernels'] == [{'name': 'fused_mlp_forward', 'calls': 1,
                                'flops': 6e9, 'bytes': 2e9}]
  phases = report['phases']
  assert phases['forward'] == {'kernels': 1, 'runs': 1, 'flops': 6e9,
                               'bytes': 2e9,
                               'seconds': pytest.approx(2e9 / 819e9)}
  for name in ('optimizer', 'other'):  # the fusion; the all-reduce
    assert phases[name]['kernels'] == 1 and phases[name]['bytes'] == 8000
    assert phases[name]['seconds'] == pytest.approx(8000 / 819e9)
  assert report['operations'][0] == {
      'phase': 'forward', 'operation': 'pallas fused_mlp_forward',
      **phases['forward']}
  text = aot.format_report(report, 'v5e:2x2')
  assert 'program: 7.0 GFLOP per chip per step' in text
  assert 'its bytes take 4.9 ms at HBM bandwidth' in text
  assert re.search(r'Pallas fused_mlp_forward +1 calls, +6.0 GFLOP, +2.00 GB',
                   text)


def test_a_negative_compiler_estimate_is_no_estimate():
  report = aot.slice_report(tiny.get_config(), FakeCompiled(-383.0), 1.0,
                            fake_v5e_slice(4))
  assert report['est_step_s'] is None and report['est_mfu'] is None
  assert report['optimal_seconds'] == -383.0
  assert 'n/a ms/step (it gave -383 s)' in aot.format_report(report, 'v5e:2x2')


# One slice's program of a two-slice job: an all-reduce within the slice,
# then the same values summed with the other slice through the megascale
# (DCN) runtime, as XLA:TPU writes it; and a host transfer that is no
# collective.
TWO_SLICES_HLO = '''HloModule two_slices
''' + ADD_COMPUTATION + '''ENTRY %main (p: f32[1000]) -> f32[1000] {
  %p = f32[1000]{0} parameter(0)
  %inside = f32[1000]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %token = token[] after-all()
  %send = (f32[1000]{0}, u32[], token[]) send(%inside, %token), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[1000]{0}, u32[], token[]) recv(%token), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done = token[] send-done(%send), channel_id=2, is_host_transfer=true
  %recv-done = (f32[1000]{0}, token[]) recv-done(%recv), channel_id=3, is_host_transfer=true
  %summed = f32[1000]{0} get-tuple-element(%recv-done), index=0
  %log = (f32[1000]{0}, u32[], token[]) send(%summed, %token), channel_id=4, is_host_transfer=true
  ROOT %done = token[] send-done(%log), channel_id=4, is_host_transfer=true
}
'''


def test_collectives_between_slices_are_told_from_those_within_one():
  ici, dcn = aot.collective_summary(aot.hlo_cost.Module(TWO_SLICES_HLO),
                                    aot.chips.CHIPS['TPU v5 lite'])
  assert ici['all-reduce'] == {'count': 1, 'bytes': 4000.0,
                               'seconds': pytest.approx(2 * 4000 / 200e9)}
  assert dcn['all-reduce'] == {'count': 1, 'bytes': 4000.0, 'seconds': None}
  assert sum(entry['count'] for entry in [*ici.values(), *dcn.values()]) == 2


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu not installed (pip install "jax[tpu]")')
def test_the_tiny_config_compiles_for_two_v5p_slices():
  """A real two-slice TPU compile (about 2 minutes): 2 x 4 chips, data
  parallel across the slices; the gradients cross DCN, each chip sending
  at least its quarter of them and at most all of them."""
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.aot', TINY, '--topology=v5p:2x2x1',
       '--num_slices=2', '--batch_per_chip=2', '--json'], cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report['chips'] == 8 and report['slices'] == 2
  assert report['mesh'] == {'data': 8, 'fsdp': 1}
  total = float32_bytes(parameter_shapes())
  assert total / 4 <= report['dcn_collectives']['all-reduce']['bytes'] <= total
  assert 'collectives across the slices (DCN):' in result.stdout
