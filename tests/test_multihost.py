"""Multi-host on one machine: 2 processes x 4 CPU devices, jax.distributed on localhost.

Checks what a pod run relies on: global arrays over processes, a checkpoint written by both
processes, a stop requested on ONE host reaching all of them (else the pod hangs in a save the
others never join), resume, and the same parameters as one process with 8 devices.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import COMPILE_FLAGS

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(num_processes, workdir, stop_at, out):
  port = str(free_port())
  env = dict(os.environ, XLA_FLAGS=COMPILE_FLAGS)  # the worker adds its device count
  return [subprocess.Popen([sys.executable, WORKER, str(pid), str(num_processes), port,
                            workdir, str(stop_at), out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
          for pid in range(num_processes)]


def run(num_processes, workdir, stop_at, out):
  results = []
  for proc in start(num_processes, workdir, stop_at, out):
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    line = next(l for l in output.splitlines() if l.startswith('RESULT '))
    results.append(json.loads(line[len('RESULT '):]))
  return results


def test_two_hosts_stop_together_resume_and_match_one_host(tmp_path):
  one = run(1, str(tmp_path / 'one'), 0, str(tmp_path / 'one.npz'))
  assert one[0]['steps'] == 4 and one[0]['devices'] == 8

  workdir, out = str(tmp_path / 'two'), str(tmp_path / 'two.npz')
  first = run(2, workdir, 2, out)  # only process 1 asks to stop after step 2
  assert [r['processes'] for r in first] == [2, 2]
  assert [r['stopped_at'] for r in first] == [2, 2]
  resumed = run(2, workdir, 0, out)
  assert [(r['stopped_at'], r['steps']) for r in resumed] == [(None, 4), (None, 4)]

  want, got = np.load(str(tmp_path / 'one.npz')), np.load(out)
  assert sorted(want) == sorted(got)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)



def test_hosts_that_do_not_share_the_workdir_stop_with_a_clear_error(tmp_path):
  """Each host with its own workdir (a path on each VM's own disk): both stop before training,
  saying why, instead of saving checkpoints in pieces and hanging when they resume."""
  procs = start(2, str(tmp_path / 'host_{pid}'), 0, str(tmp_path / 'unused.npz'))
  for proc in procs:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and 'some hosts do not see the folder' in output, output[-3000:]
  assert not os.path.exists(tmp_path / 'unused.npz')
  assert not os.path.exists(tmp_path / 'host_0' / 'checkpoints')

def test_streaming_input_across_hosts_follows_the_model_parallel_groups(tmp_path, monkeypatch):
  """2 hosts x 4 devices streaming a TFDS dataset, on meshes whose model-parallel groups lie
  inside one host (2 x 4, 4 x 2) or span both (1 x 8), and in TPU v4-like device orders where
  each host has devices in both rows of a 2 x 4 mesh, or in rows 0, 2 / 1, 3 of a 4 x 2 mesh:
  every device of a data row (one model-parallel replica) holds the same examples, different
  rows hold different examples."""
  import pytest
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.syspath_prepend(os.path.dirname(WORKER))
  import tiny_tfds
  tfds_dir = str(tmp_path / 'tfds')
  tiny_tfds.tiny_builder_class()(data_dir=tfds_dir).download_and_prepare()

  port = str(free_port())
  env = dict(os.environ, XLA_FLAGS=COMPILE_FLAGS)
  worker = os.path.join(os.path.dirname(WORKER), 'multihost_streaming_worker.py')
  procs = [subprocess.Popen([sys.executable, worker, str(pid), '2', port, tfds_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for pid in range(2)]
  shards = {}
  for proc in procs:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    line = next(l for l in output.splitlines() if l.startswith('RESULT '))
    for mesh, devices in json.loads(line[len('RESULT '):]).items():
      shards.setdefault(mesh, []).extend(devices)

  assert len(shards) == 5, sorted(shards)
  for mesh, devices in shards.items():
    data = int(mesh.split('x')[0])
    assert len(devices) == 8, mesh
    for kind in ('train', 'eval'):
      rows = {}
      for d in devices:
        rows.setdefault(d['position'][0], []).append(d[kind])
      assert sorted(rows) == list(range(data)), (mesh, kind)
      for row, held in rows.items():  # one replica: the same examples on each of its devices
        assert all(h == held[0] for h in held), (mesh, kind, row, held)
        assert len(held[0]) == 8 // data
      # Rows read disjoint shards. (A training stream shuffles across epochs of its 12-13
      # examples, so one row's batch may repeat an example; the eval pass never does.)
      for a in rows:
        for b in rows:
          assert a == b or not set(rows[a][0]) & set(rows[b][0]), (mesh, kind, rows)
      if kind == 'eval':
        examples = [i for held in rows.values() for i in held[0]]
        assert len(set(examples)) == len(examples) == 8, (mesh, rows)


MAKE_ONCE = r'''
import os, sys, time
pid, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=pid)
sys.path.insert(0, os.getcwd())
from mpl.data import datasets
marker = os.path.join(folder, 'built')

def make():
  with open(os.path.join(folder, 'makers'), 'a') as f:
    f.write(f'{pid}\n')
  time.sleep(1.0)   # every host has looked by now
  open(marker, 'w').close()

# A gs:// path: no lock to share. Every host returns only once it is made.
datasets.run_once_across_processes('gs://bucket/data/.lock', lambda: os.path.exists(marker), make)
print('RESULT', os.path.exists(marker), flush=True)

def fail():
  raise OSError('no space left on device')

try:   # the lead fails: every host stops (none waits forever)
  datasets.run_once_across_processes('gs://bucket/other/.lock', lambda: False, fail)
except Exception as e:
  print('FAILED', type(e).__name__, e, flush=True)
'''


def test_hosts_of_a_run_build_a_dataset_once_without_a_lock(tmp_path):
  """A TFDS dataset missing on a gs:// data_dir: the hosts of one run cannot share a file lock
  there, so the lead builds it while the others wait (they all used to build it at once, and
  all but one failed when TFDS renamed its folder into place); if the lead fails, all stop."""
  port = str(free_port())
  env = dict(os.environ, XLA_FLAGS=COMPILE_FLAGS)
  procs = [subprocess.Popen([sys.executable, '-c', MAKE_ONCE, str(pid), port, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(WORKER)))
           for pid in range(2)]
  outputs = []
  for proc in procs:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and 'RESULT True' in output, output[-3000:]
    outputs.append(output)
  assert (tmp_path / 'makers').read_text() == '0\n'
  assert 'FAILED OSError no space left on device' in outputs[0], outputs[0][-3000:]
  assert 'FAILED DataError the lead host (process 0) could not make' in outputs[1], outputs[1]
