"""launch/h_noise.py: restores an MPL run's checkpoint and measures h under both h_pass modes."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from launch import h_noise
from mpl import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope='module')
def digits_mpl_run(tmp_path_factory):
  """10 steps of MPL on digits (MLP with dropout 0.1); the student is still in its 100-step
  wait, so its learning rate is 0 and it does not move. Checkpoints at steps 5 and 10."""
  workdir = str(tmp_path_factory.mktemp('digits_mpl'))
  train.train_and_evaluate(load_config('digits.py', 'method=mpl,runlocal'), workdir)
  return workdir


def test_paired_h_is_zero_and_official_h_is_not_for_a_student_that_does_not_move(
    digits_mpl_run, tmp_path):
  # A run made before options were added: its config.json lacks them; today's defaults fill in.
  run = tmp_path / 'old_run'
  shutil.copytree(digits_mpl_run, run)
  config_path = os.path.join(run, 'config.json')
  with open(config_path) as f:
    saved = json.load(f)
  del saved['mpl']['teacher_labeled_weight'], saved['mpl']['h_pass']
  with open(config_path, 'w') as f:
    json.dump(saved, f)
  out = tmp_path / 'h.json'
  png = tmp_path / 'h.png'
  assert h_noise.main([str(run), '--keys', '4', '--out', str(out), '--plot', str(png)]) == 0
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  result = json.loads(out.read_text())
  assert result['step'] == 10 and result['lr_student'] == 0.0
  official, paired = result['per_key']['official'], result['per_key']['paired']
  # The same key gives the same (zero) student step and so the same f_new under both.
  np.testing.assert_allclose(official['f_new'], paired['f_new'], rtol=1e-6)
  assert paired['h'] == [0.0] * 4
  # The released h measures dropout masks here: nonzero, and different under each key.
  assert all(h != 0.0 for h in official['h'])
  assert result['stats']['official']['std'] > 0 and result['stats']['paired']['std'] == 0
  assert result['noise_over_update'] is None   # no update to compare the noise with


@pytest.fixture(scope='module')
def moving_student_run(tmp_path_factory):
  """The same digits MPL run with no student wait or warm-up: its student moves from step 0."""
  workdir = str(tmp_path_factory.mktemp('moving_student'))
  config = load_config('digits.py', 'method=mpl,runlocal')
  config.mpl.student_optimizer.update(dict(wait_steps=0, warmup_steps=0))
  train.train_and_evaluate(config, workdir)
  return workdir


def test_with_a_moving_student_the_difference_is_the_noise_alone(moving_student_run, tmp_path):
  # Digits MPL with dropout and no wait: paired h is the update's effect (nonzero), official h
  # adds dropout noise; under each key both modes take the same step (same f_new).
  out = tmp_path / 'h.json'
  # Step 5 of 10: the cosine schedule reaches lr 0 at the last step.
  assert h_noise.main([moving_student_run, '--keys', '4', '--step', '5', '--out',
                       str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['lr_student'] > 0
  official, paired = result['per_key']['official'], result['per_key']['paired']
  np.testing.assert_allclose(official['f_new'], paired['f_new'], rtol=1e-6)
  assert all(h != 0.0 for h in paired['h'])
  for mode in (official, paired):   # h is the labeled loss's fall: f_old - f_new
    np.testing.assert_allclose(mode['h'], np.subtract(mode['f_old'], mode['f_new']), rtol=1e-6)
  noise = np.subtract(official['h'], paired['h'])
  assert np.all(np.abs(noise) > 1e-6)
  np.testing.assert_allclose(result['stats']['official_minus_paired']['std'], np.std(noise),
                             rtol=1e-5)
  np.testing.assert_allclose(result['noise_over_update'],
                             np.std(noise) / np.std(paired['h']), rtol=1e-5)


def test_chooses_the_checkpoint_and_names_the_ones_there(digits_mpl_run, tmp_path, capsys):
  out = tmp_path / 'h5.json'
  assert h_noise.main([digits_mpl_run, '--keys', '1', '--step', '5', '--out', str(out)]) == 0
  assert json.loads(out.read_text())['step'] == 5
  assert h_noise.main([digits_mpl_run, '--keys', '1', '--step', '7']) == 2
  assert 'no checkpoint at step 7' in capsys.readouterr().err


def test_without_dropout_or_batch_norm_the_two_measurements_agree(tmp_path):
  # TwoMoons' sigmoid MLP has neither: the concat pass gives x_l the logits a pass on x_l alone
  # gives, so official and paired h must be the same number (here with a moving student).
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  config.mpl.student_optimizer.wait_steps = 0
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  out = tmp_path / 'h.json'
  assert h_noise.main([str(tmp_path / 'run'), '--keys', '3', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['lr_student'] > 0
  assert any(h != 0.0 for h in result['per_key']['paired']['h'])
  np.testing.assert_allclose(result['per_key']['official']['h'], result['per_key']['paired']['h'],
                             rtol=1e-5, atol=1e-7)


def test_refuses_a_run_without_h_or_without_checkpoints(tmp_path, capsys):
  workdir = tmp_path / 'sup'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'method': 'supervised'}))
  assert h_noise.main([str(workdir)]) == 2
  assert "h exists only in MPL runs" in capsys.readouterr().err
  (workdir / 'config.json').write_text(json.dumps({'method': 'mpl', 'keep_checkpoints': 2}))
  assert h_noise.main([str(workdir)]) == 2
  assert 'no checkpoint in' in capsys.readouterr().err
  assert not (workdir / 'checkpoints').exists()   # read only: nothing created in the run
  (workdir / 'checkpoints').mkdir()
  assert h_noise.main([str(workdir)]) == 2
  assert 'no checkpoint in' in capsys.readouterr().err
  assert sorted(p.name for p in workdir.iterdir()) == ['checkpoints', 'config.json']


def test_bad_outputs_and_a_corrupt_config_are_refused_before_any_work(tmp_path, capsys):
  # --out / --plot are checked before the workdir is even read (they used to fail at the end).
  missing = tmp_path / 'no' / 'such'
  for flag, name in (('--out', 'h.json'), ('--plot', 'h.png')):
    assert h_noise.main([str(tmp_path / 'not_a_run'), flag, str(missing / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {flag} {missing / name}: the folder {missing} does not exist')
  assert h_noise.main([str(tmp_path / 'not_a_run'), '--plot', str(tmp_path / 'h.txt')]) == 2
  assert 'not an image format' in capsys.readouterr().err
  workdir = tmp_path / 'cut_short'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"method": "mpl",\n')
  assert h_noise.main([str(workdir)]) == 2
  assert f'{workdir}/config.json is not valid JSON' in capsys.readouterr().err


def test_h_dtype_compares_bfloat16_and_float32_measurements_of_one_update(moving_student_run,
                                                                         tmp_path, capsys):
  # Digits MPL with a moving student, its networks run in bfloat16: per key both measurements
  # see the same bfloat16 step; the float32 one follows the float32 network's h (the h_pass
  # comparison's 'paired' measurement) more closely than the bfloat16 one does.
  run = moving_student_run
  assert h_noise.main([run, '--compare', 'h_dtype']) == 2   # a float32 network: nothing to compare
  assert 'Add --dtype bfloat16' in capsys.readouterr().err
  out, out32 = tmp_path / 'h.json', tmp_path / 'h32.json'
  assert h_noise.main([run, '--keys', '8', '--step', '5', '--compare', 'h_dtype', '--dtype',
                       'bfloat16', '--out', str(out)]) == 0
  assert h_noise.main([run, '--keys', '8', '--step', '5', '--out', str(out32)]) == 0
  result, result32 = json.loads(out.read_text()), json.loads(out32.read_text())
  assert result['compare'] == 'h_dtype' and result['dtype'] == 'bfloat16'
  bf16, f32 = result['per_key']['model']['h'], result['per_key']['float32']['h']
  np.testing.assert_allclose(result['stats']['model_minus_float32']['mean'],
                             np.mean(np.subtract(bf16, f32)), rtol=1e-5)
  reference = result32['per_key']['paired']['h']   # the float32 network
  assert np.std(np.subtract(f32, reference)) < np.std(np.subtract(bf16, reference))
