"""Benchmark (not a test): images/s of the full strong view on the local device.

    python -m launch.bench_augment                      # MPL: flip/crop + RandAugment m=16 + Cutout
    python -m launch.bench_augment --variant fixmatch --batch 1792 --iters 10

Times a jitted `augment.strong_view` (the module's defaults: reflect padding, no second
flip-and-crop) on a uint8 batch of 32x32x3 images (batch 1792 by default; one CIFAR-10-4K MPL
step has 896 unlabeled images, batch 128 x mu 7), after compilation, over a few iterations
with fresh keys. The MPL step's own strong view, with the config's settings:
`python -m mpl.bench --config configs/cifar10_4k_mpl.py --augment_only`.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mpl.data import augment


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--variant', default='mpl', choices=['mpl', 'fixmatch'])
  p.add_argument('--batch', type=int, default=1792)
  p.add_argument('--size', type=int, default=32)
  p.add_argument('--channels', type=int, default=3)
  p.add_argument('--dtype', default='uint8', choices=['uint8', 'float32'])
  p.add_argument('--iters', type=int, default=5)
  args = p.parse_args()

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, args.size, args.size, args.channels), np.uint8)
  images = jnp.asarray(images if args.dtype == 'uint8' else images / 255.0, args.dtype)
  fn = jax.jit(lambda k, x: augment.strong_view(k, x, variant=args.variant))
  key = jax.random.key(0)

  t0 = time.perf_counter()
  fn(key, images).block_until_ready()
  compile_s = time.perf_counter() - t0
  keys = jax.block_until_ready(list(jax.random.split(key, args.iters)))  # not timed
  times = []
  cpu0 = time.process_time()
  for i in range(args.iters):
    t0 = time.perf_counter()
    fn(keys[i], images).block_until_ready()
    times.append(time.perf_counter() - t0)
  cpu = (time.process_time() - cpu0) / args.iters
  dt, best = float(np.median(times)), min(times)
  print(f'device={jax.devices()[0].device_kind} variant={args.variant} dtype={args.dtype} '
        f'batch={args.batch}x{args.size}x{args.size}x{args.channels}: '
        f'compile+first {compile_s:.1f} s, median {dt * 1e3:.1f} ms/batch '
        f'({args.batch / dt:,.0f} images/s; best {args.batch / best:,.0f} images/s), '
        f'process CPU {cpu * 1e3:.0f} ms/batch')


if __name__ == '__main__':
  main()
