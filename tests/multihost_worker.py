"""One process of a CPU multi-host run, for tests/test_multihost.py.

  python tests/multihost_worker.py PID NUM_PROCESSES PORT WORKDIR STOP_AT OUT.npz

('{pid}' in WORKDIR is replaced by PID: each process its own workdir, as on unshared disks.)

8 fake CPU devices split evenly over the processes; `jax.distributed.initialize` on localhost;
trains the TwoMoons MPL config for 4 steps (checkpoints every 2). The LAST process alone asks to
stop after step STOP_AT (as a SIGTERM reaching one host of a pod). Process 0 writes the final
checkpoint's parameters to OUT.npz; every process prints one "RESULT {json}" line.
"""
import os, sys
pid, n, port, workdir, stop_at, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                       sys.argv[4], int(sys.argv[5]), sys.argv[6])
workdir = workdir.replace('{pid}', str(pid))  # a folder of each host's own
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')  # the test's compile flags
                           + f' --xla_force_host_platform_device_count={8 // n}')
os.environ['JAX_PLATFORMS'] = 'cpu'
# TensorBoard events play no part here: without TensorFlow the lead host writes log lines and
# metrics.jsonl (reporting.Writer), and each process starts ~10 s sooner.
sys.modules['tensorflow'] = None
import jax
if n > 1:
    jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=n, process_id=pid)
import importlib.util, json
import numpy as np
from jax.experimental import multihost_utils
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mpl import train
spec = importlib.util.spec_from_file_location('c', os.path.join(ROOT, 'configs/two_moons.py'))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
c = module.get_config('method=mpl,labels=6')
c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 4, 2, 2, 2
c.batch_size, c.eval_batch_size = 16, 200
# Only the LAST process asks to stop (as a SIGTERM reaching one host of a pod).
s = train.train_and_evaluate(c, workdir, should_stop=lambda step: pid == n - 1 and step == stop_at)
e = train.build(c, workdir)
ck = train.Checkpoints(workdir, 2)
with e.activate():
    state, _ = ck.restore(e.abstract_state)
ck.close()
params = multihost_utils.process_allgather(state.params, tiled=True)
if pid == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out, **flat)
print('RESULT', json.dumps({'pid': pid, 'processes': jax.process_count(),
                            'devices': jax.device_count(), 'stopped_at': s.get('stopped_at'),
                            'steps': s['steps']}), flush=True)
