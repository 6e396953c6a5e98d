r"""Meta Pseudo Labels at the paper's largest scale: EfficientNet-L2, ImageNet + JFT, 512x512.

  python -m mpl.main --config configs/efficientnet_l2_mpl.py:unlabeled=<tfds_name> \
      --workdir gs://<bucket>/l2_mpl --config.data.data_dir=gs://<bucket>/tensorflow_datasets \
      --distributed          # on every host of a 2048-core TPU pod: launch/tpu_vm.sh

Paper (Pham et al. 2021): 90.2 % top-1 on the ImageNet validation set, EfficientNet-L2 teacher
and student, 512x512 inputs, 2,048 labeled + 16,384 unlabeled images per step, 1M steps, about
11 days on 2,048 TPUv3 cores laid out as 128 data-parallel replicas x 16 cores: each replica cut
every image into 16 strips along its width and every weight tensor 16 ways.

That layout here: `mesh = (data=128, model=16)` and `spatial_partition='width'` (mpl/sharding.py):
images are split along width over 'model' while their feature maps are at least 2 pixels per
strip (512 -> 16 strips of 32 px at the input; the last 16x16 stage is split along channels),
weights, optimizer states and the EMA are stored split 16 ways along their output channels and
gathered for the forward/backward pass. `data=-1` also works: every device not in 'model' goes
to 'data'.

Memory before you launch (no accelerator needed; compiles one replica's step ahead of time):
  python -m mpl.bench --config configs/efficientnet_l2_mpl.py:standin --dry_run --mesh 16 --tpu v3
prints per-device bytes of parameters, optimizer states, EMA, batch statistics and the compiled
step's temporaries, and whether they fit (see mpl/bench.py; `--tpu` needs libtpu, without it the
step is compiled for fake CPU devices, a rough upper estimate). Measured with the TPU v3
compiler (libtpu 0.0.42.1, 2026-12-02): parameters 241 MB, optimizer state 241 MB, EMA 121 MB
per device (960.6M parameters, teacher + student, split 16 ways), batch 113 MB; temporaries
13.1 GiB, 14.1 GiB in all: it fits a v3 core (15.5 GiB) with 1.4 GiB to spare. A v4 chip needs
13.9 GiB of temporaries (15.1 in all, of 30.75). Each compile takes about 19 min and up to
21 GiB of host memory. What makes it fit (README, Scaling up): `model.remat=True` (each MBConv
block recomputed in the backward pass; 118.7 GiB without it), `model.scan_blocks=True` (each
stage's repeated blocks as one scanned body; it also lowers the compile's host memory), the
augmentation run per core on 1/16 of the replica's images, the depthwise kernel gradient
without per-tap windows, maps too small for strips split over images, and weights gathered
block by block. Without `scan_blocks` and the last three the figure was 17.2 GiB (1.7 GiB
short), and 20.8 GiB without the augmentation change as well. `:standin,depth=1.0` (16 blocks,
same layout): 7.2 GiB.

Data the user must bring (streamed, one shard per host; hosts of one model-parallel replica read
the same shard): TFDS `imagenet2012` (labeled, all of 'train'; evaluated on 'validation') and an
unlabeled TFDS image dataset passed as `unlabeled=<tfds name>` (JFT-300M is Google-internal and
not public). See configs/imagenet_jft_mpl.py for how to prepare both.

Recipe: the ImageNet MPL recipe of configs/imagenet_jft_mpl.py (itself the ImageNet-10% recipe of
METHODS.md section 6) with what the paper states for this run: EfficientNet-L2 for teacher and
student (480,309,308 parameters each with 1000 classes), 512x512 inputs, 2,048 + 16,384 images
per step (mu = 8), 1M steps. UNVERIFIED (the sources give no L2-specific values; kept from the
ImageNet recipe): learning rates 0.15 / 0.1 x batch / 256, warm-ups 5k, student wait 20k, weight
decay 1e-4, clipping 5.0, label smoothing 0.1, UDA 0.5 / 0.6 / 20 / 50k ramp, RandAugment
magnitude 17, EMA 0.999, finetune 2,000 steps; EfficientNet-L2's own dropout 0.5 and
drop-connect 0.2 (mpl/models/efficientnet.py); bfloat16 compute.

  python -m mpl.main --config configs/efficientnet_l2_mpl.py:runlocal --workdir /tmp/l2_local
A smoke test on random stand-in images: the same method and loop with a tiny EfficientNet
(width 0.1, depth 0.1: one block per stage, CIFAR strides) at 32x32, 8 + 16 images per step,
3 MPL steps and 2 finetune steps; add --config.mesh.model=2 on 2+ devices for width strips.
Expected: finishes in about 2 minutes on 2 CPU cores (85-110 s measured, mostly compiling);
says nothing about accuracy. `:standin` keeps every full-size setting on stand-in data (for
`mpl.bench`).

Arguments: unlabeled (TFDS name of the unlabeled set; required for a real run), steps (default
1000000), seed, standin, runlocal, depth (a depth coefficient in place of L2's 5.3, e.g.
`:standin,depth=1.0`: 16 blocks instead of 88, for memory studies: its compile takes 16 min
and 15 GiB of host memory on 2 cores, the full L2's 19 min and up to 21 GiB).
"""

from mpl import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, unlabeled='', steps=1_000_000, seed=0, standin=False,
                              runlocal=False, depth=0.0)
  # The ImageNet + JFT recipe with the same arguments (it checks `unlabeled`), then L2's own.
  recipe_arg = ','.join(a for a in (arg or '').split(',') if not a.strip().startswith('depth'))
  config = config_lib.sibling_config(__file__, 'imagenet_jft_mpl.py').get_config(recipe_arg)
  if args.runlocal:
    config.model = config_lib.ml_collections.ConfigDict(dict(
        name='efficientnet', width_coefficient=0.1, depth_coefficient=0.1,
        small_images=True, dropout_rate=0.0, stochastic_depth_rate=0.0))
    config.spatial_partition = 'width'     # takes effect with --config.mesh.model=2 or more
    return config

  config.data.image_size = 512
  config.batch_size = 2048
  config.mu = 8                              # 16,384 unlabeled images per step
  config.eval_batch_size = 2048
  config.model = config_lib.ml_collections.ConfigDict(dict(
      name='efficientnet_l2', dtype='bfloat16',   # dropout 0.5, drop-connect 0.2: L2 defaults
      remat=True,         # recompute each block in the backward pass: 119 -> 20 GiB per v3 core
      scan_blocks=True))  # one compiled body per stage's repeated blocks (14, not 88)
  if args.depth:
    # L2's width with fewer blocks: the same per-core layout, for memory studies (mpl.bench).
    config.model = config_lib.ml_collections.ConfigDict(dict(
        name='efficientnet', width_coefficient=4.3, depth_coefficient=args.depth,
        dropout_rate=0.5, stochastic_depth_rate=0.2, dtype='bfloat16', remat=True,
        scan_blocks=True))
  # 2,048 cores. mpl.bench --dry_run reads mesh.data as the real run's replica count; to time
  # a slice of the step on one GPU: --config.mesh.data=1 --config.mesh.model=1 and a small batch.
  config.mesh.data, config.mesh.model = 128, 16
  config.spatial_partition = 'width'
  return config
