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

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run(num_processes, workdir, stop_at, out):
  port = str(free_port())
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # the worker sets its own
  procs = [subprocess.Popen([sys.executable, WORKER, str(pid), str(num_processes), port,
                             workdir, str(stop_at), out],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for pid in range(num_processes)]
  results = []
  for proc in procs:
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
