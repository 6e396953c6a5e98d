r"""Meta Pseudo Labels on all of ImageNet + a large unlabeled set (the paper: JFT), ResNet-50.

  python -m mpl.main --config configs/imagenet_jft_mpl.py:unlabeled=<tfds_name> \
      --workdir /tmp/imagenet_jft_mpl --config.data.data_dir=/path/to/tensorflow_datasets

Paper (Pham et al. 2021): ResNet-50 trained with MPL on labeled ImageNet + unlabeled JFT reaches
83.2 % top-1 on the ImageNet validation set (after the finetune stage below). The flagship
EfficientNet-L2 run (90.2 %, 512x512, 2,048 labeled + 16,384 unlabeled per step, 1M steps) took
about 11 days on 2,048 TPUv3 cores; the paper's hardware time for the ResNet-50 run is not
stated.

Data the user must bring (both streamed by mpl/data/streaming.py, never held in memory):
* labeled: TFDS `imagenet2012`, split `data.labeled_split='train'` (all 1,281,167 training
  images), downloaded by hand (image-net.org registration; ILSVRC2012_img_{train,val}.tar in
  <data_dir>/downloads/manual, then
  `tfds.builder('imagenet2012', data_dir=...).download_and_prepare()`); evaluation on
  `data.eval_split='validation'`.
* unlabeled: JFT-300M is Google-internal and NOT public. Pass any prepared TFDS image dataset
  (in the same data_dir) as `unlabeled=<tfds name>`; it sets `data.unlabeled_dataset`, read
  from its split `data.unlabeled_split` ('train'; change with
  --config.data.unlabeled_split=...). Its labels, if any, are ignored. The result will differ
  from the paper's by as much as that dataset differs from JFT. Without the argument
  `get_config` raises a ConfigError (except for `runlocal` / `standin`).

Recipe: per step 4,096 labeled + 32,768 unlabeled images (mu = 8), 224x224, ResNet-50 teacher and
student. The remaining values are the ImageNet-10% recipe of METHODS.md section 6 (see
configs/imagenet10_mpl.py, including its augmentation: stream crop + flip, RandAugment with no
extra pad-and-crop or Cutout, grey fill 128), which the sources do not restate for this run --
UNVERIFIED for JFT: 1M steps; SGD Nesterov with lr x batch / 256 (teacher 0.15 -> 2.4, student
0.1 -> 1.6), 5k warm-ups, student wait 20k, cosine; weight decay 1e-4; clipping 5.0; label
smoothing 0.1; dropout 0.1; UDA temperature 0.5 / threshold 0.6 / weight 20 / ramp 50k;
RandAugment magnitude 17; EMA 0.999; bfloat16 compute.

Finetune stage (paper; `config.finetune`): after MPL the EMA student is trained on the labeled
ImageNet images only with SGD at a constant lr 1e-5, batch 512 (WORKDIR/finetune), and
WORKDIR/summary.json reports the finetuned student as `final` (compare with 83.2) and the MPL
stage under `before_finetune`. Steps: 2,000, UNVERIFIED -- METHODS.md gives no step count for
this run; 2,000 is the ImageNet-10% value. `--config.finetune.steps=0` skips the stage.

  python -m mpl.main --config configs/imagenet_jft_mpl.py:runlocal --workdir /tmp/jft_local
A smoke test of the model, method, finetune stage and loop on random stand-in images of
ImageNet's shapes (`data.standin='if_missing'`, in memory; used as both labeled and unlabeled
data, `unlabeled` may stay empty): a 4-block bottleneck ResNet (`name='resnet'`, stage_sizes
(1, 1, 1, 1), 8 base filters) on 32x32 stand-in images instead of ResNet-50 at 224x224,
float32, 8 labeled + 16 unlabeled images per step, 3 MPL steps, then 2 finetune steps at batch
16.
`:standin` keeps every full-size setting but trains on stand-in data where imagenet2012 is not
prepared, for `mpl.bench` (on one GPU bench a slice of the batch, e.g. --config.batch_size=16,
and scale by the batch ratio); without `unlabeled` a prepared imagenet2012 is its own
unlabeled set there.

Arguments: unlabeled (TFDS name of the unlabeled set; required for a real run), steps (MPL
steps, default 1000000), seed, standin, runlocal.
"""

from mpl import config_lib
from mpl.errors import ConfigError


def get_config(arg=None):
  args = config_lib.parse_arg(arg, unlabeled='', steps=1_000_000, seed=0, standin=False,
                              runlocal=False)
  if not args.unlabeled and not (args.runlocal or args.standin):
    raise ConfigError(
        'configs/imagenet_jft_mpl.py needs the unlabeled dataset: pass unlabeled=<tfds name> '
        '(e.g. --config=configs/imagenet_jft_mpl.py:unlabeled=my_images), the name of a '
        'prepared TFDS image dataset in --config.data.data_dir. JFT-300M is not public; '
        'use configs/imagenet10_mpl.py for ImageNet alone.')
  config = config_lib.base_config()
  config.method = 'mpl'
  config.dataset = 'imagenet2012'          # streamed (datasets.STREAMING_DATASETS)
  config.num_labeled = -1                  # all of ImageNet is labeled
  config.seed = args.seed
  config.data.seed = args.seed
  config.data.image_size = 224
  config.data.labeled_split = 'train'
  config.data.unlabeled_dataset = args.unlabeled   # '' (runlocal/standin): imagenet2012 itself
  config.data.unlabeled_split = 'train'
  config.data.eval_split = 'validation'

  config.batch_size = 4096
  config.mu = 8                            # 32,768 unlabeled images per step
  config.total_steps = args.steps
  config.eval_batch_size = 1024
  config.eval_every = 10_000
  config.log_every = 100
  config.checkpoint_every = 5000
  config.label_smoothing = 0.1
  config.ema_decay = 0.999

  config.model = config_lib.ml_collections.ConfigDict(dict(
      name='resnet50', dropout_rate=0.1, dtype='bfloat16'))

  config.augment.labeled = 'none'          # the stream already crops and flips
  config.augment.flip = True
  config.augment.pad = 0                   # no pad-and-crop on top of the Inception crop
  config.augment.fill = 128                # official grey
  config.augment.strong = 'mpl'
  config.augment.magnitude = 17.0
  config.augment.num_layers = 2
  config.augment.cutout_size = 0           # official ImageNet: no Cutout after RandAugment

  mpl = config.mpl
  mpl.feedback = 'first_order'
  mpl.pseudo_label = 'sample'
  mpl.baseline_decay = 0.99
  mpl.student_label_smoothing = 0.1
  mpl.uda_weight = 20.0
  mpl.uda_ramp_steps = 50_000
  mpl.uda_temperature = 0.5
  mpl.uda_threshold = 0.6
  for opt, lr, wait in ((mpl.teacher_optimizer, 0.15, 0), (mpl.student_optimizer, 0.1, 20_000)):
    opt.name = 'sgd'
    opt.lr = lr
    opt.scale_lr_by_batch = True           # x 4096 / 256
    opt.momentum = 0.9
    opt.nesterov = True
    opt.weight_decay = 1e-4
    opt.clip_norm = 5.0
    opt.wait_steps = wait
    opt.warmup_steps = 5000
    opt.decay = 'cosine'

  config.finetune.steps = 2000             # UNVERIFIED for this run (see the docstring)
  config.finetune.lr = 1e-5
  config.finetune.batch_size = 512

  if args.standin or args.runlocal:
    config.data.standin = 'if_missing'     # stand-in data unless imagenet2012 is prepared
    config.eval_batch_size = 64
    config.data.max_eval_examples = 128
  if args.runlocal:
    config.data.image_size = 32
    config.model = config_lib.ml_collections.ConfigDict(dict(
        name='resnet', stage_sizes=(1, 1, 1, 1), num_filters=8, dropout_rate=0.1,
        dtype='float32'))                  # 4 bottleneck blocks: fast to compile
    config.batch_size = 8
    config.mu = 2
    config.total_steps = 3
    config.eval_every = config.log_every = config.checkpoint_every = 3
    config.finetune.steps = 2
    config.finetune.batch_size = 16        # a multiple of the 8 test devices
  return config
