r"""Where a compiled train step spends its time: a profiler trace of a few steps, read back.

  python -m mpl.bench --config configs/cifar10_4k_mpl.py --config.data.standin=if_missing \
      --profile /tmp/profile

After its timed steps, `mpl.bench --profile DIR` runs --profile_steps more steps of the same
step (on a GPU compiled once more: see 'GPU command buffers' below) under
`jax.profiler.trace(DIR)` (the trace stays there: TensorBoard's profile plugin, xprof or
Perfetto open it) and reads it back with `jax.profiler.ProfileData`. Each XLA op the first
device ran for the step is charged its time, per step, to

  - a kind, from the optimised HLO of the compiled step (`compiled.as_text()`): convolution,
    matmul, elementwise (loop fusions, lone elementwise ops), reduction, gather/scatter
    (gathers, scatters, dynamic slices, sorts), copy/transpose (layout changes and other data
    movement), collective (all-reduce, all-gather, ...; their time includes waiting for the
    other devices to get there), control flow, command buffer, other. A fusion takes the kind
    of the heaviest thing it computes: a convolution with its batch norm fused in is a
    convolution.
  - a stage: the `jax.named_scope`s the update wraps its stages in, read from the op's metadata
    (MPL: views, teacher_forward, pseudo_labels, h_pass (f_old), student_step,
    student_step/h_pass (f_new), teacher_step, ema; the loop: batch), with ' (backward)' for ops
    of a gradient. A fusion of ops of several stages (the end of the strong view fused into the
    teacher's input) is charged to 'stage_a + stage_b', not to its root's stage alone: a
    stage's share of the step is then between its own row and its own row plus those it is
    part of (the text table sums these fusions in one line and gives each stage's part in them
    as '+ fused'; the record's by_stage lists each). Ops with no metadata (layout copies the
    compiler added; on a CPU, the weight gradients it rewrites) take the stage of the nearest
    op they feed, else of one they read.
    '(unscoped)': outside every scope (the metrics); '(several stages)': ops XLA merged
    across stages (a combined all-reduce of several stages' gradients).

Per step:
  - `wall_ms`: host wall time (each step ended by block_until_ready), with the tracer running.
  - `op_ms`: the sum of the ops' durations. A CPU runs independent ops on several threads at
    once, so it can exceed the wall time.
  - `busy_ms`: the time during which at least one op ran. `wall_ms - busy_ms` is time the
    device (or the CPU's XLA threads) had nothing to run: dispatch, launch gaps, the host.
Time is counted once: an event that encloses others of its thread (a loop around its body) is
left out. On a GPU, kernels (and copies) come from the device's stream lines and are
attributed by the op their `hlo_op` statistic, or XLA's annotation of their launch, names; one
without either, or with a name not in the program, is 'unattributed' (listed by name in
`top_ops`). On a TPU, the ops are the events of the device's 'XLA Ops' line. `events` counts
what ran: on a GPU kernels, and one op may launch several.

GPU command buffers: by default XLA:GPU records runs of ops into CUDA graphs and replays each
as one command buffer, and the profiler then names the command buffer, not the ops in it (the
kernels lose their attribution). `mpl.bench --profile` therefore traces, on a GPU, the same
lowered step compiled once more with command buffers off (`PROFILE_COMPILER_OPTIONS`; the
timed figures are the default program's). The profile's wall time is then that program's: the
launches the command buffers save show there, as `wall_ms - busy_ms`. An op that is still a
command buffer (a profile of a program compiled with them) is kind 'command buffer'.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import time
import warnings
from typing import Any, Callable, Iterable

import jax

KINDS = ('convolution', 'matmul', 'elementwise', 'reduction', 'gather/scatter', 'copy/transpose',
         'collective', 'control flow', 'command buffer', 'other', 'unattributed')
# XLA options of the program a profile traces, per platform (module docstring).
PROFILE_COMPILER_OPTIONS = {'gpu': {'xla_gpu_enable_command_buffer': ''}}
UNSCOPED = '(unscoped)'
BACKWARD = ' (backward)'
SEVERAL = '(several stages)'   # ops XLA merged across stages (a combined all-reduce)

_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
                'collective-broadcast', 'send', 'recv')
_GATHER_SCATTER = ('gather', 'scatter', 'dynamic-slice', 'dynamic-update-slice', 'sort')
_REDUCTIONS = ('reduce', 'reduce-window', 'select-and-scatter')
_LAYOUT = ('copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'parameter', 'constant',
           'tuple', 'get-tuple-element', 'slice', 'concatenate', 'pad', 'copy-start', 'copy-done',
           'bitcast-convert', 'iota')
_CONTROL = ('while', 'conditional', 'async-done')   # call, async-start: see op_table
_DEVICE_PLANES = ('/device:GPU:', '/device:TPU:')
# Lines an XLA/xprof profile may derive from the kernel lines (they would count each op twice).
_DERIVED_LINES = ('XLA Ops', 'XLA Modules', 'Steps', 'Framework Ops', 'Framework Name Scope',
                  'Source code', 'XLA TraceMe', 'Async XLA Ops', 'TensorFlow Ops',
                  'TensorFlow Name Scope', 'Launch Stats')


# -- the compiled program: what each op is --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
  opcode: str
  called: tuple[str, ...]      # computations it calls (fusion body, loop body, reduce region)
  target: str                  # custom_call_target, '' if none
  op_name: str                 # metadata op_name: the JAX name stack, '' if none
  operands: tuple[str, ...]    # names it reads (instructions of the same computation)
  scalar: bool = False         # its result is one number (f32[]: an lr, a loss weight)


_INSTRUCTION = re.compile(r'^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_CALLED = re.compile(r'\b(?:calls|to_apply|body|condition|branch_computations)='
                     r'(\{[^}]*\}|%?[\w.\-]+)')


def _after_result_type(rest: str) -> str:
  """An HLO instruction's right-hand side without its result type: 'opcode(operands), ...'."""
  if rest.startswith('('):  # a tuple type, possibly nested and with spaces
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rest[i + 1:].lstrip()
    return ''
  return rest.split(' ', 1)[1].lstrip() if ' ' in rest else ''


def _operand_list(rest: str) -> str:
  """The text between an HLO instruction's opcode and its attributes: its operands' list."""
  text = _after_result_type(rest)
  depth = 0
  for i, ch in enumerate(text):
    depth += ch == '('
    depth -= ch == ')'
    if ch == ')' and depth == 0:
      return text[:i + 1]
  return text


def _opcode(rest: str) -> str:
  """The opcode of an HLO instruction's right-hand side: after the result type, before '('."""
  match = re.match(r'([a-z][a-z0-9\-]*)\(', _after_result_type(rest))
  return match.group(1) if match else ''


def parse_hlo(hlo_text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
  """({instruction name: Instruction}, {computation name: [instruction names]}) of HLO text."""
  instructions, computations = {}, {}
  current = None
  for line in hlo_text.splitlines():
    if not line.startswith((' ', '\t')):
      match = _COMPUTATION.match(line)
      current = match.group(1) if match else None
      if current is not None:
        computations[current] = []
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    name, rest = match.groups()
    called = []
    for group in _CALLED.findall(rest):
      called += [c.strip().lstrip('%') for c in group.strip('{}').split(',') if c.strip()]
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    operands = tuple(n for n in re.findall(r'%([\w.\-]+)', _operand_list(rest))
                     if n not in called)
    instructions[name] = Instruction(
        opcode=_opcode(rest), called=tuple(called), target=target.group(1) if target else '',
        op_name=op_name.group(1) if op_name else '', operands=operands,
        scalar=re.match(r'[a-z]\w*\[\]', rest) is not None)
    computations[current].append(name)
  return instructions, computations


def _kind_of_opcodes(opcodes: set[str], targets: set[str]) -> str:
  """The kind of a set of computed opcodes (an op, or everything a fusion computes)."""
  targets_text = ' '.join(t.lower() for t in targets)
  if 'convolution' in opcodes or 'conv' in targets_text:
    return 'convolution'
  if 'dot' in opcodes or any(k in targets_text for k in ('gemm', 'matmul', 'cublas')):
    return 'matmul'
  if any(o.startswith(_COLLECTIVES) for o in opcodes):
    return 'collective'
  if opcodes & set(_GATHER_SCATTER):
    return 'gather/scatter'
  if opcodes & set(_REDUCTIONS):
    return 'reduction'
  if opcodes & set(_CONTROL):
    return 'control flow'
  if opcodes and opcodes <= set(_LAYOUT):
    return 'copy/transpose'
  if 'custom-call' in opcodes or 'rng-bit-generator' in opcodes:
    return 'other'
  return 'elementwise' if opcodes else 'other'


def op_table(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (kind, stage)} for every instruction of the program.

  A fusion's kind comes from everything it computes (its fused computation and what that calls,
  recursively). Its stage comes from its own metadata, else from its fused instructions'. Ops
  that carry no metadata at all (layout copies the compiler added; on a CPU, the weight
  gradients it rewrote) take the stage of the nearest op they feed, else of the nearest op
  they read.
  """
  instructions, computations = parse_hlo(hlo_text)

  def computed(name: str, seen: set[str]) -> tuple[set[str], set[str], list[tuple[str, bool]]]:
    """Opcodes, custom-call targets and the (op_name, scalar) of what `name` computes (its own
    first, then the root's side first)."""
    inst = instructions[name]
    opcodes, targets = {inst.opcode}, {inst.target} - {''}
    op_names = [(inst.op_name, inst.scalar)] if inst.op_name else []
    if inst.opcode in ('fusion', 'call', 'async-start'):
      for computation in inst.called:
        if computation in seen:
          continue
        seen.add(computation)
        for member in reversed(computations.get(computation, ())):   # the root first
          sub_ops, sub_targets, sub_names = computed(member, seen)
          opcodes |= sub_ops
          targets |= sub_targets
          op_names += sub_names
      opcodes -= {'fusion', 'call', 'async-start'}   # wrappers: the kind of what they wrap
    return opcodes, targets, op_names

  table, named = {}, {}
  for name, inst in instructions.items():
    opcodes, targets, op_names = computed(name, set())
    if inst.opcode in ('while', 'conditional'):
      kind = 'control flow'
    elif inst.opcode == 'call' and any(c.startswith('command_buffer') for c in inst.called):
      kind = 'command buffer'   # its ops ran as one CUDA graph, unseen by the profiler
    else:
      kind = _kind_of_opcodes(opcodes, targets)
    table[name] = kind
    if op_names:
      named[name] = stage_of(op_names[0][0])
      if inst.opcode == 'fusion':   # a number from another stage (an lr) does not count
        named[name] = fused_stage(named[name], {stage_of(n) for n, scalar in op_names
                                                if not scalar})

  # Nameless ops: the stage of the nearest named op downstream (breadth first), else upstream.
  users = collections.defaultdict(list)
  for members in computations.values():
    member_set = set(members)
    for name in members:
      for operand in instructions[name].operands:
        if operand in member_set:
          users[operand].append(name)

  def nearest(start: str, edges) -> str | None:
    frontier, seen = [start], {start}
    while frontier:
      for name in frontier:
        if name in named and name != start:
          return named[name]
      frontier = [n for name in frontier for n in edges(name) if n not in seen]
      seen.update(frontier)
    return None

  out = {}
  for name, kind in table.items():
    stage = named.get(name) or nearest(name, lambda n: users[n]) or nearest(
        name, lambda n: [o for o in instructions[n].operands if o in instructions])
    out[name] = (kind, stage or UNSCOPED)
  return out


def fused_stage(own: str, stages: set[str]) -> str:
  """The stage of a fusion whose ops come from `stages` (`own`: its root's): XLA fuses across
  the stages' boundaries (the end of the strong view into the teacher's input), and charging the
  whole kernel to the root's stage would hide the others' share. A fusion of several stages is
  'stage_a + stage_b' (sorted; ' (backward)' if its root is a gradient op); ops outside every
  scope, the forward/backward halves of one stage and (see op_table) single numbers, such as
  an lr another stage computed, do not count as another stage."""
  bases = {stage.removesuffix(BACKWARD) for stage in stages} - {UNSCOPED, SEVERAL}
  if len(bases) <= 1:
    return own
  return ' + '.join(sorted(bases)) + (BACKWARD if own.endswith(BACKWARD) else '')


def module_name(hlo_text: str) -> str:
  match = re.match(r'\s*HloModule\s+([\w.\-]+)', hlo_text)
  return match.group(1) if match else ''


# -- the JAX name stack: which stage of the update an op belongs to -------------------------------

_SCOPE = re.compile(r'^[a-z][a-z0-9_]*$')
# Transformations wrap the names they were applied under: 'transpose(jvp(h_pass))'.
# Lower-case names JAX itself puts in the name stack (loops, calls, branches): not scopes.
_JAX_NAMES = frozenset(('while', 'body', 'cond', 'closed_call', 'core_call', 'scan', 'remat',
                        'checkpoint', 'custom_jvp_call', 'custom_vjp_call', 'pjit', 'shard_map',
                        'xla_call', 'xla_pmap', 'named_call'))
_TRANSFORM = re.compile(r'^(?:jvp|transpose|vmap|remat|checkpoint|linearize)\((.*)\)$')


def stage_of(op_name: str) -> str:
  """The named scope(s) of an op's JAX name stack, '(backward)' for gradient ops.

  'jit(train_step)/student_step/transpose(jvp(h_pass))/mul' -> 'student_step/h_pass
  (backward)'. The scopes are the leading run of plain lower-case names after the jitted
  function, looking inside transformations (jvp(...), transpose(...), vmap(...)); a module
  (WideResNet), a nested jit (jit(_uniform)) or the primitive (the last name) ends it.
  """
  if not op_name:
    return UNSCOPED
  jitted, _, rest = op_name.partition('/')
  if jitted.startswith('jit(') and rest.startswith('(') and rest.endswith(')'):
    # Ops XLA merged (a combined all-reduce): 'jit(f)/(name_1:name_2:...)'.
    stages = {stage_of(f'{jitted}/{name}') for name in rest[1:-1].split(':')}
    return stages.pop() if len(stages) == 1 else SEVERAL
  parts = op_name.split('/')
  if parts[0].startswith('jit('):
    parts = parts[1:]
  scopes = []
  for part in parts[:-1]:    # the last part is the primitive itself
    while (match := _TRANSFORM.match(part)):
      part = match.group(1)
    if not part:             # a transformation applied outside any scope: 'jvp()'
      continue
    if not _SCOPE.match(part) or part in _JAX_NAMES or part.startswith('branch_'):
      break
    scopes.append(part)
  stage = '/'.join(scopes) or UNSCOPED
  return stage + BACKWARD if 'transpose(' in op_name else stage


# -- the trace: what ran, for how long ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpEvent:
  op: str            # HLO instruction name; '' for a device kernel without one
  start_ns: float
  duration_ns: float
  line: str          # where it ran: (plane, line) as one string


def _stats(event) -> dict[str, Any]:
  with warnings.catch_warnings():
    # jaxlib on Python 3.12 builds the type of `stats` lazily, with a DeprecationWarning ("no
    # __module__ attribute") that a warnings-as-errors setting turns into an abort.
    warnings.simplefilter('ignore', DeprecationWarning)
    try:
      return dict(event.stats)
    except (TypeError, ValueError):
      return {}


def events_of(profile, module: str) -> list[OpEvent]:
  """The op events of `module` on the first device of a profile (jax.profiler.ProfileData).

  - GPU: every event of the first GPU's plane (its stream lines), with the op its 'hlo_op'
    statistic or its launch annotation names (`_op_and_module`), '' where none does (time
    still spent on the device: 'unattributed'). Lines derived from others (_DERIVED_LINES)
    and the profiler's own overhead are left out.
  - TPU: the events of the first TPU's 'XLA Ops' line, each named by its op.
  - Otherwise (the CPU backend): the host plane's events that have an 'hlo_op', of the
    lowest 'device_ordinal'.
  Events of other modules (other jitted programs) are left out, unless none has the module's
  name.
  """
  devices = sorted((p for p in profile.planes if p.name.startswith(_DEVICE_PLANES)),
                   key=lambda p: _device_number(p.name))
  found = []   # (event, its module or None, its device ordinal or None)
  if devices:
    plane = devices[0]
    on_tpu = plane.name.startswith('/device:TPU:')
    for line in plane.lines:
      if on_tpu != (line.name == 'XLA Ops'):   # a TPU's ops; else every line but those
        continue
      if not on_tpu and (line.name in _DERIVED_LINES or 'overhead' in line.name.lower()):
        continue
      for event in line.events:
        stats = _stats(event)
        op, module_of_event = _op_and_module(stats)
        if op is None and on_tpu:
          op = event.name
        found.append((_op_event(event, op, plane, line), module_of_event, None))
  else:
    for plane in (p for p in profile.planes if p.name.startswith('/host:')):
      for line in plane.lines:
        for event in line.events:
          stats = _stats(event)
          op, module_of_event = _op_and_module(stats)
          if op is not None:   # else host bookkeeping, Python frames
            found.append((_op_event(event, op, plane, line), module_of_event,
                          stats.get('device_ordinal')))
    ordinals = [o for _, _, o in found if o is not None]
    if ordinals:
      first = min(ordinals)
      found = [f for f in found if f[2] is None or f[2] == first]
  if any(str(m) == module for _, m, _ in found):
    found = [f for f in found if f[1] is None or str(f[1]) == module]
  return [event for event, _, _ in found]


def _op_event(event, op: str | None, plane, line) -> OpEvent:
  return OpEvent(op=str(op or ''), start_ns=float(event.start_ns),
                 duration_ns=float(event.duration_ns), line=f'{plane.name}|{line.name}')


_ANNOTATED = re.compile(r'\b(hlo_op|hlo_module)=([^,#:\s]+)')


def _op_and_module(stats: dict[str, Any]) -> tuple[str | None, str | None]:
  """The HLO op and module an event ran, from its 'hlo_op' / 'hlo_module' statistics.

  Where a GPU trace's kernels lack them (they are derived when the trace is processed, by
  some versions only), the annotation XLA wrapped the kernel's launch in (statistic
  'annotation' or 'kernel_annotation') names them: an annotation stack such as
  'XlaModule:#hlo_module=jit_step,program_id=5#::Thunk:#hlo_op=loop_add_fusion.3#'. Its
  innermost hlo_op and outermost hlo_module are taken.
  """
  op, module = stats.get('hlo_op'), stats.get('hlo_module')
  if op is None:
    annotation = stats.get('annotation', stats.get('kernel_annotation'))
    if isinstance(annotation, bytes):
      annotation = annotation.decode(errors='replace')
    if isinstance(annotation, str):
      found = collections.defaultdict(list)
      for key, value in _ANNOTATED.findall(annotation):
        found[key].append(value)
      op = found['hlo_op'][-1] if found['hlo_op'] else None
      if module is None and found['hlo_module']:
        module = found['hlo_module'][0]
  return op, module


def _device_number(plane_name: str) -> int:
  match = re.search(r'(\d+)$', plane_name)
  return int(match.group(1)) if match else 0


def leaf_events(events: Iterable[OpEvent], is_loop: Callable[[str], bool] = lambda op: False
                ) -> list[OpEvent]:
  """The events that enclose no other event, so that no time is counted twice.

  An event enclosing a later event of its own line is a parent (a loop around its body, run on
  one thread). `is_loop(op)` names the ops (while, conditional) whose bodies may run on other
  threads: those are dropped when any other event starts inside them.
  """
  events = sorted((e for e in events if e.duration_ns > 0),
                  key=lambda e: (e.start_ns, -e.duration_ns))
  last_on_line = {}   # line -> index of the latest event on it
  parents = set()
  for i, event in enumerate(events):
    previous = last_on_line.get(event.line)
    if previous is not None and event.start_ns + event.duration_ns <= _end(events[previous]):
      parents.add(previous)
    last_on_line[event.line] = i
    if event.op and is_loop(event.op) and i + 1 < len(events) and \
        events[i + 1].start_ns < _end(event):
      parents.add(i)
  return [e for i, e in enumerate(events) if i not in parents]


def _end(event: OpEvent) -> float:
  return event.start_ns + event.duration_ns


def busy_ns(events: Iterable[OpEvent]) -> float:
  """Length of the union of the events' intervals (time during which any op ran)."""
  total, current_start, current_end = 0.0, None, None
  for event in sorted(events, key=lambda e: e.start_ns):
    end = event.start_ns + event.duration_ns
    if current_end is None or event.start_ns > current_end:
      if current_end is not None:
        total += current_end - current_start
      current_start, current_end = event.start_ns, end
    else:
      current_end = max(current_end, end)
  if current_end is not None:
    total += current_end - current_start
  return total


def summarize(events: list[OpEvent], table: dict[str, tuple[str, str]], *, steps: int,
              wall_s: float, top: int = 12) -> dict[str, Any]:
  """Per-step milliseconds by kind, by stage and for the heaviest ops (module docstring)."""
  leaves = leaf_events(events, is_loop=lambda op: table.get(op, ('',))[0] == 'control flow')
  per_step = 1e-6 / steps
  by_kind, by_stage = collections.Counter(), collections.Counter()
  by_op, count = collections.Counter(), collections.Counter()
  for event in leaves:
    kind, stage = table.get(event.op, ('unattributed', UNSCOPED))
    by_kind[kind] += event.duration_ns * per_step
    by_stage[stage] += event.duration_ns * per_step
    by_op[event.op or '(no hlo_op)'] += event.duration_ns * per_step
    count[event.op or '(no hlo_op)'] += 1
  op_ms = sum(by_kind.values())
  share = lambda ms: ms / op_ms if op_ms else 0.0
  return {
      'steps': steps,
      'wall_ms': 1e3 * wall_s / steps,
      'busy_ms': busy_ns(leaves) * per_step,
      'op_ms': op_ms,
      'events': len(leaves),
      'by_kind': {k: {'ms': ms, 'share': share(ms)} for k, ms in by_kind.most_common()},
      'by_stage': {s: {'ms': ms, 'share': share(ms)} for s, ms in by_stage.most_common()},
      'top_ops': [{'op': op, 'kind': table.get(op, ('unattributed', UNSCOPED))[0],
                   'stage': table.get(op, ('unattributed', UNSCOPED))[1], 'ms': ms,
                   'share': share(ms), 'runs_per_step': count[op] / steps}
                  for op, ms in by_op.most_common(top)],
  }


def format_summary(summary: dict[str, Any]) -> str:
  """The summary as a few plain-text tables (what `--profile` prints and writes)."""
  lines = [f"per step ({summary['steps']} profiled): wall {summary['wall_ms']:.2f} ms, "
           f"ops busy {summary['busy_ms']:.2f} ms, op time {summary['op_ms']:.2f} ms "
           f"({summary['events']} op runs)"]
  lines += [f'NOTE: {note}' for note in summary.get('notes', ())]
  if summary.get('compiler_options'):
    lines.append('traced program compiled with ' + ', '.join(
        f'{k}={v!r}' for k, v in summary['compiler_options'].items()))
  lines.append(f'\n{"by kind":<34} {"ms/step":>9} {"share":>7}')
  lines += [f'{name:<34} {row["ms"]:>9.3f} {100 * row["share"]:>6.1f}%'
            for name, row in summary['by_kind'].items()]
  # Fusions across stages ('a + b', see fused_stage) in one line; each stage's column '+ fused'
  # is its part in them (at most: the time of the fusions it is in).
  single = {k: v for k, v in summary['by_stage'].items() if ' + ' not in k}
  fused = {k: v for k, v in summary['by_stage'].items() if ' + ' in k}
  members = {k: set(k.removesuffix(BACKWARD).split(' + ')) for k in fused}
  lines.append(f'\n{"by stage":<34} {"ms/step":>9} {"share":>7} {"+ fused":>9}')
  only_fused = {m + (BACKWARD if k.endswith(BACKWARD) else '') for k in fused for m in members[k]}
  for name in sorted(only_fused - set(single)):   # a stage only ever fused into others
    single[name] = {'ms': 0.0, 'share': 0.0}
  for name, row in single.items():
    extra = sum(fused[k]['ms'] for k in fused if name.removesuffix(BACKWARD) in members[k]
                and k.endswith(BACKWARD) == name.endswith(BACKWARD))
    lines.append(f'{name:<34} {row["ms"]:>9.3f} {100 * row["share"]:>6.1f}%' +
                 (f' {"+" + format(extra, ".3f"):>9}' if extra else ''))
  if fused:
    ms = sum(row['ms'] for row in fused.values())
    share = sum(row['share'] for row in fused.values())
    lines.append(f'{"fused across stages (" + str(len(fused)) + " kinds)":<34} {ms:>9.3f} '
                 f'{100 * share:>6.1f}%')
  lines.append(f'\n{"heaviest ops":<34} {"ms/step":>9} {"share":>7}  kind, stage')
  lines += [f'{row["op"][:34]:<34} {row["ms"]:>9.3f} {100 * row["share"]:>6.1f}%  '
            f'{row["kind"]}, {row["stage"]}' for row in summary['top_ops']]
  return '\n'.join(lines)


def _trace_notes(profile, events: list[OpEvent], backend: str) -> list[str]:
  """What the reader of a profile must know about the trace it came from."""
  notes = []
  if backend != 'cpu' and not any(p.name.startswith(_DEVICE_PLANES) for p in profile.planes):
    notes.append(f'the trace has no {backend.upper()} plane: these are the host\'s launch '
                 'times, not the device\'s (on a GPU the profiler needs CUPTI, from the '
                 'nvidia-cuda-cupti package)')
  if not events:
    notes.append('no op of this program is in the trace')
  return notes


def profile_steps(run_step: Callable[[], Any], *, steps: int, trace_dir: str,
                  hlo_text: str, compiler_options: dict[str, str] | None = None
                  ) -> dict[str, Any]:
  """Runs `run_step` (one blocking step) `steps` times under the profiler; the summary.

  The trace is kept in `trace_dir` (its .xplane.pb path is the summary's 'trace'), and the
  tables are written next to it as profile.txt. `compiler_options`: the XLA options the
  program was compiled with, for the record.
  """
  if steps < 1:
    raise ValueError(f'profile steps must be >= 1, got {steps}')
  os.makedirs(trace_dir, exist_ok=True)
  before = set(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    for _ in range(steps):
      run_step()
    wall_s = time.perf_counter() - t0
  new = sorted(set(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))
               - before, key=os.path.getmtime)
  if not new:
    raise RuntimeError(f'the profiler wrote no .xplane.pb under {trace_dir}')
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  profile = ProfileData.from_file(new[-1])
  events = events_of(profile, module_name(hlo_text))
  summary = summarize(events, op_table(hlo_text), steps=steps, wall_s=wall_s)
  summary['trace'] = new[-1]
  summary['compiler_options'] = dict(compiler_options or {})
  summary['notes'] = _trace_notes(profile, events, jax.default_backend())
  with open(os.path.join(trace_dir, 'profile.txt'), 'w') as f:
    f.write(format_summary(summary) + '\n')
  return summary
