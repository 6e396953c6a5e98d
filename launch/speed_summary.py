"""The issue figures in `launch/gpu_figures.sh speed`'s results.jsonl, as a few readable lines.

    python -m launch.speed_summary OUT/results.jsonl

Reads the JSON lines the script wrote (its setup line, `mpl.bench` records named bench_* and
augment, Fashion-MNIST run records) and prints, for each that is there:
  - every train-step bench: median ms per step (each step blocked) and back to back, images/s,
    TFLOP per step (and which count: 'program' = the step as written, counted on the CPU
    backend; 'compiled' = the backend's own, which on a GPU leaves out convolutions), achieved
    TFLOP/s, XLA's temporaries and the device's peak memory;
  - the bfloat16 profile: busy vs wall time, the heaviest kinds of op, and the strong
    augmentation's share of the step (the `views` stage, alone and with the fusions it shares
    with other stages: its share lies between the two);
  - the augmentation alone: images/s at its batch;
  - the Fashion-MNIST runs: final (and best) accuracy, steps, wall time.
What is missing (a step skipped or failed; errors.txt says why) is skipped here.
"""
import json
import sys


def _gib(value) -> str:
  return f'{value / 2**30:.2f} GiB' if value else '-'


def bench_line(r: dict) -> str:
  flops = r.get('flops_per_step')
  tflops = r.get('achieved_tflops')
  temp = (r.get('memory_analysis') or {}).get('temp_bytes')
  return (f"{r['name']:<14} {r.get('dtype', '?'):<9} {r['step_ms_median']:8.2f} ms/step "
          f"(back to back {r.get('step_ms_back_to_back', float('nan')):.2f}), "
          f"{r['images_per_s']:,.0f} images/s, "
          + (f"{flops / 1e12:.3f} TFLOP/step ({r.get('flops_counted_on', '?')}), "
             f"{tflops:.1f} TFLOP/s, " if flops and tflops else 'FLOPs unknown, ')
          + f"temp {_gib(temp)}, peak {_gib(r.get('peak_bytes_in_use'))}")


def views_share(profile: dict) -> tuple[float, float, float]:
  """(views ms, ms of the fusions views shares with other stages, op ms) per step."""
  own = fused = 0.0
  for stage, row in profile.get('by_stage', {}).items():
    members = set(stage.removesuffix(' (backward)').split(' + '))
    if stage == 'views':
      own += row['ms']
    elif ' + ' in stage and 'views' in members:
      fused += row['ms']
  return own, fused, profile.get('op_ms', 0.0)


def profile_lines(r: dict) -> list[str]:
  p = r['profile']
  if 'error' in p:
    return [f"  profile: {p['error']}"]
  kinds = ', '.join(f"{kind} {100 * row['share']:.0f}%"
                    for kind, row in list(p.get('by_kind', {}).items())[:4])
  own, fused, op_ms = views_share(p)
  lines = [f"  profile ({r['name']}): wall {p['wall_ms']:.2f} ms, busy {p['busy_ms']:.2f} ms "
           f"per step; by kind: {kinds}"]
  if op_ms:
    lines.append(f"  strong augmentation (stage 'views'): {own:.3f} ms/step = "
                 f"{100 * own / op_ms:.1f}% of op time, up to {100 * (own + fused) / op_ms:.1f}% "
                 f"with the fusions it shares ({fused:.3f} ms)")
  return lines + [f'  NOTE: {note}' for note in p.get('notes', ())]


def summary(records: list[dict]) -> list[str]:
  lines = []
  for r in records:
    if 'setup' in r:
      s = r['setup']
      lines.append(f"{s.get('mode')}: {s.get('gpu')} (backend {s.get('backend')}, jax "
                   f"{s.get('jax')}{', SMOKE' if s.get('smoke') else ''})")
    elif r.get('mode') == 'train_step':
      lines.append(bench_line(r))
      if r.get('profile'):
        lines += profile_lines(r)
    elif r.get('mode') == 'augment_only':
      lines.append(f"{r['name']:<14} strong view ({r.get('variant')}, magnitude "
                   f"{r.get('magnitude')}) on {r['batch']} images "
                   f"{'x'.join(map(str, r.get('image_shape', [])))}: "
                   f"{r['batch_ms_median']:.2f} ms/batch, {r['images_per_s']:,.0f} images/s")
    elif 'run' in r:
      if 'final' in r:
        final, best = r['final'], r.get('best', {})
        labels = 'all' if r.get('num_labeled') == -1 else r.get('num_labeled')
        lines.append(f"{r['run']:<14} {r.get('model')} labels {labels}: final "
                     f"{100 * final['accuracy']:.2f}%, best {100 * best.get('accuracy', 0):.2f}% "
                     f"(step {best.get('step')}), {r.get('steps')} steps in "
                     f"{r.get('wall_s', 0):.0f} s")
      else:
        last = r.get('last_eval') or {}
        lines.append(f"{r['run']:<14} no summary ({r.get('error', '?')}); last eval: "
                     + (json.dumps(last) if last else 'none'))
  return lines


def main(argv):
  if len(argv) != 2:
    sys.exit('usage: python -m launch.speed_summary OUT/results.jsonl')
  records = []
  with open(argv[1]) as f:
    for line in f:
      line = line.strip()
      if line.startswith('{'):
        try:
          records.append(json.loads(line))
        except ValueError:
          pass   # a line cut short by a time limit
  print('\n'.join(summary(records)))


if __name__ == '__main__':
  main(sys.argv)
