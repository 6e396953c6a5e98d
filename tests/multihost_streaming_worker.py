"""One process of a CPU multi-host streaming run, for tests/test_multihost.py.

  python tests/multihost_streaming_worker.py PID NUM_PROCESSES PORT TFDS_DIR

8 fake CPU devices split evenly over the processes; `jax.distributed.initialize` on localhost.
For each mesh (data x model) in MESHES, builds the streaming input over the tiny TFDS dataset in
TFDS_DIR (tests/tiny_tfds.py, prepared by the test) and takes one training batch and the first
eval batch. Prints one "RESULT {json}" line: for every device this process holds, its position
in the mesh and the examples in its shard of each batch.
"""
import os, sys
pid, n, port, tfds_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')  # the test's compile flags
                           + f' --xla_force_host_platform_device_count={8 // n}')
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=n, process_id=pid)
import json
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from mpl import config_lib, sharding
from mpl.data import streaming
import tiny_tfds

# (data, model, device order): 'torus' lays the devices out as jax.make_mesh may on TPU v4: on
# 2 x 4 half of each process's devices in each data row, on 4 x 2 each process in every other
# row (rows 0, 2 and 1, 3).
MESHES = ((2, 4, 'process'), (1, 8, 'process'), (4, 2, 'process'), (2, 4, 'torus'),
          (4, 2, 'torus'))
builder = tiny_tfds.tiny_builder_class()(data_dir=tfds_dir)
result = {}
for data, model, order in MESHES:
    c = config_lib.base_config()
    c.dataset, c.data.streaming, c.data.image_size = 'tiny_images', True, 16
    c.data.labeled_split = c.data.eval_split = 'train'
    c.mesh.data, c.mesh.model = data, model
    c.batch_size = c.eval_batch_size = 8
    devices = jax.devices()
    if order == 'torus':
        devices = [devices[i] for i in (0, 1, 4, 5, 2, 3, 6, 7)]
    mesh = sharding.make_mesh(c, devices)
    position = {d.id: [int(i) for i in np.argwhere(mesh.devices == d)[0]] for d in mesh.devices.flat}
    stream = streaming.StreamingInput(c, mesh, uses_unlabeled=False, builder=builder)
    stream.start(0)
    train_images = stream.next_batch()['labeled']['image']
    eval_images = next(stream.eval_batches())['image']
    result[f'{data}x{model} {order}'] = [
        {'device': shard.device.id, 'position': position[shard.device.id],
         'train': tiny_tfds.example_ids(np.asarray(shard.data)),
         'eval': tiny_tfds.example_ids(np.asarray(e.data))}
        for shard, e in zip(sorted(train_images.addressable_shards, key=lambda s: s.device.id),
                            sorted(eval_images.addressable_shards, key=lambda s: s.device.id))]
print('RESULT', json.dumps(result), flush=True)
