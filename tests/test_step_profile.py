"""mpl.step_profile: where a train step's time goes (`mpl.bench --profile`).

The kinds and stages are read from real compiled programs and real traces; the bookkeeping
(time counted once, the union of overlapping ops) on events made up to the nanosecond.
"""

import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from mpl import bench, step_profile
from mpl.step_profile import BACKWARD, SEVERAL, UNSCOPED, OpEvent

from test_bench import ROOT, load_config


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_kinds_and_stages_of_a_compiled_gradient():
  def loss(w, v, x):
    with jax.named_scope('features'):
      y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO',
                                                                                  'NHWC'))
      y = jnp.mean(jax.nn.relu(y), axis=(1, 2))
    with jax.named_scope('head'):
      return jnp.sum(jnp.tanh(y @ v))

  x = jnp.ones((4, 16, 16, 3))
  w = jnp.ones((3, 3, 3, 32)) * 0.01
  v = jnp.ones((32, 64)) * 0.01
  table = step_profile.op_table(_compiled_text(jax.grad(loss, argnums=(0, 1)), w, v, x))
  pairs = set(table.values())
  # The forward convolution, and the backward's (the weight gradient), each in its own stage.
  assert ('convolution', 'features') in pairs, pairs
  assert ('convolution', 'features' + BACKWARD) in pairs, pairs
  assert ('matmul', 'head') in pairs, pairs
  assert any(kind == 'reduction' and stage.startswith('features') for kind, stage in pairs), pairs
  kinds = {kind for kind, _ in pairs}
  assert kinds <= set(step_profile.KINDS), kinds



def test_a_fusion_across_stages_is_charged_to_all_of_them():
  """The end of one stage fused into the next stage's first op: the kernel is charged to both
  ('teacher_forward + views'), not to the stage of its root alone."""
  def step(x, w):
    with jax.named_scope('views'):
      x = jnp.where(x > 0.5, x * 2.0, 1.0 - x)
    with jax.named_scope('teacher_forward'):
      return jnp.sum(jnp.tanh(x) @ w)

  x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
  stages = {stage for _, stage in step_profile.op_table(_compiled_text(step, x, w)).values()}
  assert 'teacher_forward + views' in stages, stages
  assert step_profile.fused_stage('teacher_step' + BACKWARD, {
      'teacher_step' + BACKWARD, 'teacher_step', UNSCOPED}) == 'teacher_step' + BACKWARD
  assert step_profile.fused_stage('student_step' + BACKWARD, {
      'student_step' + BACKWARD, 'student_step/h_pass'}) == (
          'student_step + student_step/h_pass' + BACKWARD)

  # A number another stage computed (an lr, a loss weight) fused into a stage's kernel does not
  # make it a fusion across stages.
  def update(w, g):
    with jax.named_scope('schedule'):
      lr = 0.1 * jnp.cos(jnp.sum(w) * 0.0)
    with jax.named_scope('student_step'):
      return w - lr * jnp.tanh(g)

  w = jnp.ones((64, 32))
  stages = {stage for _, stage in step_profile.op_table(_compiled_text(update, w, w)).values()}
  assert 'student_step' in stages and not any(' + ' in stage for stage in stages), stages

@pytest.mark.parametrize('op_name, stage', [
    ('jit(train_step)/teacher_forward/jvp(WideResNet)/block_1/conv/conv_general_dilated',
     'teacher_forward'),
    ('jit(train_step)/student_step/transpose(jvp(h_pass))/jvp(WideResNet)/mul',
     'student_step/h_pass' + BACKWARD),
    ('jit(train_step)/teacher_step/transpose(jvp())/add_any', 'teacher_step' + BACKWARD),
    ('jit(train_step)/views/while/body/closed_call/vmap()/add', 'views'),
    ('jit(train_step)/jvp(WideResNet)/Dropout_0/mul', UNSCOPED),   # a module is not a scope
    ('jit(train_step)/jit(_uniform)/shift_right_logical', UNSCOPED),   # nor a nested jit
    ('jit(train_step)/vmap()/cond/branch_1/mul', UNSCOPED),
    ('jit(train_step)/mul', UNSCOPED),
    ('', UNSCOPED),
    # Ops XLA merged (a combined all-reduce): one stage if they share it, else several.
    ('jit(train_step)/(student_step/jvp(WideResNet)/head_bn/reduce_sum:'
     'student_step/jvp()/reduce_sum)', 'student_step'),
    ('jit(train_step)/(teacher_step/transpose(jvp(WideResNet))/stem/conv_general_dilated:'
     'teacher_step/jvp()/reduce_sum:reduce_sum)', SEVERAL),
])
def test_stage_of_reads_the_named_scopes(op_name, stage):
  assert step_profile.stage_of(op_name) == stage


def test_opcode_after_a_tuple_type():
  assert step_profile._opcode('(f32[2]{0}, (s32[], u8[0]{0})) tuple(%a, %b)') == 'tuple'
  assert step_profile._opcode('f32[8,4]{1,0} fusion(%p.1), kind=kLoop, calls=%fc.2') == 'fusion'
  assert step_profile._opcode('f32[] constant(0)') == 'constant'


_ASYNC_HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_exp (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %exponential.1 = f32[8]{0} exponential(f32[8]{0} %param_0)
}

%wrapped (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %loop_exp_fusion = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fused_exp
}

ENTRY %main.9 (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %start = ((f32[8]{0}), f32[8]{0}, s32[]) async-start(f32[8]{0} %x), calls=%wrapped
  %done = f32[8]{0} async-done(((f32[8]{0}), f32[8]{0}, s32[]) %start)
  %conv = f32[8]{0} reduce-precision(f32[8]{0} %done), exponent_bits=8, mantissa_bits=7, metadata={op_name="jit(step)/ema/reduce_precision"}
  ROOT %neg = f32[8]{0} negate(f32[8]{0} %conv), metadata={op_name="jit(step)/ema/neg"}
}
"""


def test_kinds_of_wrapped_and_rounding_ops_and_operands_after_a_tuple_type():
  table = step_profile.op_table(_ASYNC_HLO)
  assert table['start'][0] == 'elementwise'        # the kind of what it runs, not a wrapper's
  assert table['conv'] == ('elementwise', 'ema')   # rounding is elementwise, not a reduction
  # Nameless ops inherit the stage of the op they feed, through a tuple-typed result too.
  assert table['done'][1] == 'ema' and table['start'][1] == 'ema', table
  instructions, _ = step_profile.parse_hlo(_ASYNC_HLO)
  assert instructions['done'].operands == ('start',)


def _event(op, start, duration, line='cpu|thread 1'):
  return OpEvent(op=op, start_ns=start, duration_ns=duration, line=line)


def test_time_is_counted_once():
  events = [
      _event('while.1', 0, 100),          # a loop around its body, on its own thread...
      _event('body_a', 10, 30),           # ...whose body runs on the same thread
      _event('body_b', 50, 40),
      _event('nested', 55, 10),           # a grandchild: body_b is then a parent too
      _event('while.2', 200, 50),         # a loop whose body ran on another thread
      _event('body_c', 210, 30, line='cpu|thread 2'),
      _event('loop_free', 300, 20),       # a plain op: kept
      _event('marker', 400, 0),           # zero-length: no time
  ]
  leaves = step_profile.leaf_events(events, is_loop=lambda op: op.startswith('while'))
  assert sorted(e.op for e in leaves) == ['body_a', 'body_c', 'loop_free', 'nested']
  # busy = union of intervals: two threads overlapping count once.
  overlapping = [_event('a', 0, 10), _event('b', 5, 10, line='cpu|thread 2'), _event('c', 30, 5)]
  assert step_profile.busy_ns(overlapping) == 20


# How XLA:GPU writes a run of ops it replays as one CUDA graph (command buffer).
_COMMAND_BUFFER_HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_sine (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  ROOT %sine.1 = f32[8]{0} sine(f32[8]{0} %param_0), metadata={op_name="jit(step)/views/sin"}
}

%command_buffer (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %loop_sine_fusion = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fused_sine
}

ENTRY %main.7 (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  ROOT %call.4 = f32[8]{0} call(f32[8]{0} %x), to_apply=%command_buffer
}
"""


def test_a_command_buffer_is_its_own_kind():
  table = step_profile.op_table(_COMMAND_BUFFER_HLO)
  assert table['call.4'] == ('command buffer', 'views')   # not the kind of what it holds
  assert table['loop_sine_fusion'] == ('elementwise', 'views')
  assert step_profile.module_name(_COMMAND_BUFFER_HLO) == 'jit_step'


@pytest.mark.parametrize('stats, op_and_module', [
    ({'hlo_op': 'fusion.3', 'hlo_module': 'jit_step', 'device_ordinal': 0},
     ('fusion.3', 'jit_step')),
    # A raw GPU trace: the annotation stack XLA wrapped the kernel's launch in.
    ({'annotation': 'XlaModule:#hlo_module=jit_step,program_id=5#::'
                    'Thunk:#hlo_op=loop_add_fusion.3#'}, ('loop_add_fusion.3', 'jit_step')),
    ({'kernel_annotation': b'Thunk:#hlo_op=cudnn-conv.12,hlo_module=jit_step,program_id=2#'},
     ('cudnn-conv.12', 'jit_step')),
    ({'annotation': 'Thunk:#name=%fusion.4,hlo_op=fusion.4,unique_hlo_op_id=17#'},
     ('fusion.4', None)),
    # Thunks nested in a loop's: the kernel is the innermost op's, not the loop's.
    ({'annotation': 'XlaModule:#hlo_module=jit_step,program_id=5#::Thunk:#hlo_op=while.3#::'
                    'Thunk:#hlo_op=loop_add_fusion.7#'}, ('loop_add_fusion.7', 'jit_step')),
    ({'annotation': 'some_user_range'}, (None, None)),
    ({'correlation_id': 7}, (None, None)),
])
def test_the_op_an_event_ran(stats, op_and_module):
  assert step_profile._op_and_module(stats) == op_and_module


def _plane(name, *lines):
  return types.SimpleNamespace(name=name, lines=[
      types.SimpleNamespace(name=line_name, events=[
          types.SimpleNamespace(name=event_name, start_ns=start, duration_ns=duration,
                                stats=stats)
          for event_name, start, duration, stats in events])
      for line_name, events in lines])


def test_events_of_a_gpu_trace():
  kernel = lambda op: {'hlo_op': op, 'hlo_module': 'jit_step', 'correlation_id': 1}
  profile = types.SimpleNamespace(planes=[
      _plane('/host:CPU', ('python', [('train_step', 0, 100, {})])),
      _plane('/device:GPU:1', ('Stream #7(Kernel)', [('k', 0, 10, kernel('fusion.2'))])),
      _plane('/device:GPU:0',
             ('Stream #7(Kernel)', [
                 ('loop_add_fusion', 0, 10, kernel('fusion.1')),
                 ('sm90_xmma_fprop', 10, 30, {'annotation':
                                              'Thunk:#name=conv,hlo_op=cudnn-conv.3,'
                                              'hlo_module=jit_step,unique_hlo_op_id=4#'}),
                 ('other_program', 40, 5, {'hlo_op': 'fusion.9', 'hlo_module': 'jit_init'}),
                 ('memcpy', 45, 2, {})]),
             ('CUPTI overhead', [('overhead', 0, 50, {})]),
             ('XLA Ops', [('fusion.1', 0, 10, kernel('fusion.1'))])),   # derived: not twice
  ])
  events = step_profile.events_of(profile, 'jit_step')
  assert [(e.op, e.duration_ns) for e in events] == [('fusion.1', 10), ('cudnn-conv.3', 30),
                                                    ('', 2)]
  assert {e.line for e in events} == {'/device:GPU:0|Stream #7(Kernel)'}


def test_events_of_a_tpu_trace():
  profile = types.SimpleNamespace(planes=[
      _plane('/device:TPU:0', ('Steps', [('1', 0, 100, {})]),
             ('XLA Modules', [('jit_step(5)', 0, 100, {})]),
             ('XLA Ops', [('fusion.1', 0, 40, {}), ('convolution.2', 40, 50, {})])),
      _plane('/device:TPU:1', ('XLA Ops', [('fusion.1', 0, 40, {})])),
  ])
  events = step_profile.events_of(profile, 'jit_step')
  assert [(e.op, e.duration_ns) for e in events] == [('fusion.1', 40), ('convolution.2', 50)]


def test_events_of_a_cpu_trace_ignore_other_planes():
  profile = types.SimpleNamespace(planes=[
      _plane('/device:CUSTOM:0', ('x', [('y', 0, 1, {'hlo_op': 'fusion.7'})])),
      _plane('/host:CPU', ('tf_XLAPjRtCpuClient', [
          ('fusion.1', 0, 10, {'hlo_op': 'fusion.1', 'hlo_module': 'jit_step',
                               'device_ordinal': 1}),
          ('fusion.1', 0, 12, {'hlo_op': 'fusion.1', 'hlo_module': 'jit_step',
                               'device_ordinal': 0}),
          ('PjitFunction', 0, 50, {})])),   # host bookkeeping
  ])
  events = step_profile.events_of(profile, 'jit_step')
  assert [(e.op, e.duration_ns) for e in events] == [('fusion.1', 12)]


def test_a_trace_without_the_device_says_so():
  host_only = types.SimpleNamespace(planes=[_plane('/host:CPU', ('python', []))])
  some_op = [_event('fusion.1', 0, 1)]
  assert step_profile._trace_notes(host_only, some_op, 'cpu') == []
  (note,) = step_profile._trace_notes(host_only, some_op, 'gpu')
  assert note.startswith('the trace has no GPU plane') and 'CUPTI' in note
  with_gpu = types.SimpleNamespace(planes=[_plane('/device:GPU:0', ('Stream #7', []))])
  assert step_profile._trace_notes(with_gpu, [], 'gpu') == [
      'no op of this program is in the trace']


def test_an_op_ending_with_the_op_around_it_is_counted_once():
  """A child that ends exactly when its parent ends (the last op of a called computation) is
  still inside it: the parent is left out, its time is not counted twice."""
  events = [_event('call.1', 0, 100), _event('fusion.2', 60, 40), _event('fusion.3', 200, 10)]
  leaves = step_profile.leaf_events(events)
  assert sorted(e.op for e in leaves) == ['fusion.2', 'fusion.3']
  table = {'call.1': ('other', 'views'), 'fusion.2': ('elementwise', 'views'),
           'fusion.3': ('elementwise', 'ema')}
  summary = step_profile.summarize(events, table, steps=1, wall_s=1e-3)
  assert summary['op_ms'] == pytest.approx(50e-6)
  assert summary['by_stage']['views']['ms'] == pytest.approx(40e-6)


def test_summary_sums_per_step():
  table = {'conv.1': ('convolution', 'student_step'), 'fusion.2': ('elementwise', 'views')}
  events = [_event('conv.1', 0, 3e6), _event('fusion.2', 3e6, 1e6),
            _event('conv.1', 10e6, 3e6), _event('fusion.2', 13e6, 1e6),
            _event('cublas-kernel', 14e6, 2e6)]   # not an op of this program
  summary = step_profile.summarize(events, table, steps=2, wall_s=20e-3)
  assert summary['wall_ms'] == pytest.approx(10)
  assert summary['op_ms'] == pytest.approx(5)
  assert summary['busy_ms'] == pytest.approx(5)
  assert summary['by_kind']['convolution']['ms'] == pytest.approx(3)
  assert summary['by_kind']['unattributed']['ms'] == pytest.approx(1)
  assert summary['by_stage']['views']['share'] == pytest.approx(0.2)
  top = summary['top_ops'][0]
  assert (top['op'], top['kind'], top['runs_per_step']) == ('conv.1', 'convolution', 1)
  assert 'student_step' in step_profile.format_summary(summary)
  # A fusion across stages is one row of its own, and a part of each stage's '+ fused' column.
  table['fusion.2'] = ('elementwise', 'student_step + views')
  text = step_profile.format_summary(step_profile.summarize(events, table, steps=2,
                                                            wall_s=20e-3))
  assert re.search(r'student_step +3\.000 +60\.0% +\+1\.000\n', text), text
  assert re.search(r'views +0\.000 +0\.0% +\+1\.000\n', text), text
  assert re.search(r'fused across stages \(1 kinds\) +1\.000 +20\.0%', text), text
  # A backward fusion is part of the backward rows only.
  table['fusion.2'] = ('elementwise', 'student_step + views' + BACKWARD)
  text = step_profile.format_summary(step_profile.summarize(events, table, steps=2,
                                                            wall_s=20e-3))
  assert re.search(r'student_step +3\.000 +60\.0%\n', text), text
  assert re.search(r'views \(backward\) +0\.000 +0\.0% +\+1\.000\n', text), text
  assert re.search(r'student_step \(backward\) +0\.000 +0\.0% +\+1\.000\n', text), text


def test_bench_profiles_the_mpl_step(tmp_path):
  config = load_config('cifar10_4k_mpl.py', 'runlocal')
  config.data.standin = 'always'
  record = bench.bench_train_step(config, steps=1, warmup=1, workdir=str(tmp_path / 'w'),
                                  profile_dir=str(tmp_path / 'profile'), profile_steps=2)
  profile = record['profile']
  assert os.path.isfile(profile['trace'])
  assert (tmp_path / 'profile' / 'profile.txt').read_text().startswith('per step (2 profiled)')
  assert record['final_step'] == 1 + 2 * 1 + 2   # the profiled steps run after the timed ones
  assert profile['compiler_options'] == {}    # on a CPU: the timed program itself
  assert profile['notes'] == []
  # Every op the device ran is one of this program's, and the tables add up.
  assert 'unattributed' not in profile['by_kind'], profile['by_kind']
  assert profile['by_kind']['convolution']['ms'] > 0
  if record['devices'] > 1:   # data parallel: the gradients' all-reduce
    assert profile['by_kind']['collective']['ms'] > 0
  for table in ('by_kind', 'by_stage'):
    assert sum(row['ms'] for row in profile[table].values()) == pytest.approx(profile['op_ms'])
  assert 0 < profile['busy_ms'] <= profile['op_ms'] * (1 + 1e-9)
  assert profile['busy_ms'] <= profile['wall_ms'] * 1.01
  # The MPL update's stages, each found in the trace.
  stages = set(profile['by_stage'])
  for stage in ('views', 'teacher_forward', 'h_pass', 'student_step', 'student_step/h_pass',
                'student_step' + BACKWARD, 'teacher_step', 'teacher_step' + BACKWARD):
    assert stage in stages, (stage, sorted(stages))
  # One device's ops (the mesh has jax.device_count() of them): each op as often in every
  # step (once, or a whole number of times in a loop), not once per device.
  assert record['devices'] == jax.device_count() == 8
  runs = [row['runs_per_step'] for row in profile['top_ops']]
  assert all(r == int(r) and 1 <= r < 8 for r in runs), profile['top_ops']
  assert runs.count(1) > len(runs) / 2, profile['top_ops']


@pytest.mark.parametrize('option, applied', [('xla_gpu_enable_command_buffer', True),
                                              ('xla_no_such_option', False)])
def test_bench_profiles_a_program_compiled_with_the_profile_options(option, applied, tmp_path,
                                                                    monkeypatch, caplog):
  # What a GPU gets (command buffers off), here on the CPU; an option this XLA refuses must
  # still leave a profile, of the timed program.
  monkeypatch.setitem(step_profile.PROFILE_COMPILER_OPTIONS, 'cpu', {option: ''})
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  record = bench.bench_train_step(config, steps=1, warmup=1, workdir=str(tmp_path / 'w'),
                                  profile_dir=str(tmp_path / 'profile'), profile_steps=2)
  profile = record['profile']
  assert profile['compiler_options'] == ({option: ''} if applied else {})
  warmup_of_the_new_program = 1 if applied else 0
  assert record['final_step'] == 1 + 2 * 1 + warmup_of_the_new_program + 2
  assert 'student_step' in profile['by_stage'], profile['by_stage']
  assert ('compiling with' in caplog.text) != applied, caplog.text
  text = (tmp_path / 'profile' / 'profile.txt').read_text()
  assert (f"traced program compiled with {option}=''" in text) == applied, text


def test_a_failed_profile_keeps_the_timed_figures(tmp_path, monkeypatch):
  def trace_format_unknown(*args, **kwargs):
    raise ValueError('a trace this code does not know')
  monkeypatch.setattr(step_profile, 'profile_steps', trace_format_unknown)
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  record = bench.bench_train_step(config, steps=2, warmup=1, workdir=str(tmp_path / 'w'),
                                  profile_dir=str(tmp_path / 'profile'))
  assert record['profile'] == {'error': 'ValueError: a trace this code does not know'}
  assert record['step_ms_median'] > 0 and record['final_step'] == 1 + 2 * 2


def test_bench_cli_refuses_profile_with_augment_only():
  result = subprocess.run(
      [sys.executable, '-m', 'mpl.bench', '--config', 'configs/two_moons.py:method=mpl,runlocal',
       '--augment_only', '--profile', '/tmp/never_written'],
      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert '--profile profiles the train step' in result.stderr
  assert not os.path.exists('/tmp/never_written')
