r"""Meta Pseudo Labels on ImageNet-10% (10 % of the training images labeled), ResNet-50.

  python -m mpl.main --config configs/imagenet10_mpl.py --workdir /tmp/imagenet10_mpl \
      --config.data.data_dir=/path/to/tensorflow_datasets

Paper (Pham et al. 2021): 73.89 % top-1 on the ImageNet validation set, ResNet-50 teacher and
student, after the finetune stage (below); evaluated model: the EMA student. Run time on the
paper's hardware: not stated in the paper for this benchmark. Measure yours on stand-in data of
the same shapes:
  python -m mpl.bench --config configs/imagenet10_mpl.py:standin --steps 10
and multiply step_ms_median by 700,000. The full step (1,024 + 2 x 15,360 images through the
teacher) needs many accelerators; on one GPU bench a slice, e.g. --config.batch_size=16 (mu
stays 15), and scale by the batch ratio.

Data: TFDS `imagenet2012`, which must be downloaded by hand (registration at image-net.org: put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual and run
`tfds.builder('imagenet2012', data_dir=...).download_and_prepare()`, several hours, ~150 GB).
It is streamed (mpl/data/streaming.py: tf.data, one shard per host), never held in memory.
* Labeled: `data.labeled_split = 'train[:10%]'`, the first 10 % (128,117 images, TFDS rounds
  to the closest example) of the TFDS train split. TFDS stores examples in a hash-shuffled
  order, so this slice holds approximately but not exactly 10 % of every class (sampling
  noise on top of class sizes of 732..1,300); it is NOT the paper's 10 % subset (the fixed
  split files of earlier work, 128,116 images), and `data.seed` does not change it. Another
  slice: --config.data.labeled_split='train[10%:20%]'.
* Unlabeled: `data.unlabeled_split = 'train'`, all 1,281,167 training images (as the paper).
* Evaluation: `data.eval_split = 'validation'` (50,000 images; resize to 256, central 224 crop).

The official recipe (METHODS.md section 6; google-research/meta_pseudo_labels README flags and
data_utils.py):
  batch 1024 labeled + mu 15 (15,360 unlabeled, weak and strong views), 700k steps, 224x224;
  SGD Nesterov 0.9, lr x batch / 256: teacher 0.15 (= 0.6), student 0.1 (= 0.4); teacher 5k
  warm-up then cosine; student lr 0 for 20k steps, 5k warm-up, cosine (warm-ups: README flags);
  coupled weight decay 1e-4; global-norm clipping 5.0 (both); label smoothing 0.1 (teacher's
  labeled loss and the student's pseudo-label loss, as the official code); dense dropout 0.1;
  UDA temperature 0.5, threshold 0.6, weight 20 with a 50k-step ramp; RandAugment magnitude 17;
  student EMA 0.999; bfloat16 compute (as on TPU), float32 parameters. The network is the
  official ResNet-50 (`OFFICIAL_RESNET`, see mpl/models/resnet.py): batch norm decay 0.99 and
  epsilon 1e-3 (the flags every official network uses), every batch-norm scale starting at 1,
  the classifier drawn from U(+-1/sqrt(classes)), TF's SAME padding. The model's own defaults
  are torchvision's.
  Augmentation as in the official ImageNet input: the stream gives every training image an
  Inception random-resized crop + flip, so the labeled images get nothing more
  (`augment.labeled='none'`), the unlabeled weak view is a further random flip (`augment.pad=0`)
  and the strong view that + RandAugment, with no separate Cutout after it
  (`augment.cutout_size=0`); geometric ops and RandAugment's own Cutout op fill with grey 128
  (`augment.fill`). Not copied: the official ImageNet RandAugment's translate/cutout constants
  (100 / 40 px); ours scale with the image (image_size // 8 = 28 px at 224).

Two deliberate differences from the released code: h, the teacher's feedback, is measured
'paired' (`mpl.h_pass`), as configs/cifar10_4k_mpl.py explains (`--config.mpl.h_pass=official`
for parity runs); and the two labeled passes that measure it run at full float32 precision while
the network trains in bfloat16 (`mpl.h_dtype`; bfloat16 rounding is as large as h, see
mpl/methods/mpl.py; `--config.mpl.h_dtype=model` measures it in bfloat16).

Finetune stage (paper; `config.finetune`): after MPL the EMA student is trained on the labeled
split only (stream crop + flip, cross-entropy with label smoothing 0.1, no EMA) for 2,000 steps
of SGD at a constant lr 1e-5, batch 512, in WORKDIR/finetune. WORKDIR/summary.json reports the
finetuned student as `final` (compare with 73.89) and the MPL stage under `before_finetune`;
`--config.finetune.steps=0` skips the stage.

  python -m mpl.main --config configs/imagenet10_mpl.py:runlocal --workdir /tmp/in10_local
A smoke test of the model, method, finetune stage and loop on random stand-in images
(`data.standin='if_missing'`, in memory; a prepared imagenet2012 would be streamed instead): a
4-block bottleneck ResNet (`name='resnet'`, stage_sizes (1, 1, 1, 1), 8 base filters: the
ResNet-50 code with one block per stage) on 32x32 stand-in images instead of ResNet-50 at
224x224, float32, 8 labeled + 16 unlabeled images per step, 3 MPL steps, then 2 finetune steps
at batch 16; all 512 stand-in images labeled. The small network and images keep compilation
within about a minute on 2 CPU cores; they say nothing about speed or accuracy at full size.
`:standin` keeps every full-size setting but trains on stand-in data where imagenet2012 is not
prepared (for `mpl.bench`).

Arguments: steps (MPL steps, default 700000), seed (init and step randomness), standin,
runlocal.
"""

from mpl import config_lib

# The official MPL ResNet-50's settings where they differ from mpl/models/resnet.py's defaults.
OFFICIAL_RESNET = dict(bn_momentum=0.99, bn_epsilon=1e-3, zero_init_residual=False,
                       classifier_init='official', padding='SAME')


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=700_000, seed=0, standin=False, runlocal=False)
  config = config_lib.base_config()
  config.method = 'mpl'
  config.dataset = 'imagenet2012'          # streamed (datasets.STREAMING_DATASETS)
  config.num_labeled = -1                  # streaming: the labeled set is data.labeled_split
  config.seed = args.seed
  config.data.seed = args.seed
  config.data.image_size = 224
  config.data.labeled_split = 'train[:10%]'   # TFDS slice, see the docstring
  config.data.unlabeled_dataset = ''       # the labeled dataset
  config.data.unlabeled_split = 'train'    # official: unlabeled = all training images
  config.data.eval_split = 'validation'

  config.batch_size = 1024
  config.mu = 15
  config.total_steps = args.steps
  config.eval_batch_size = 1024
  config.eval_every = 10_000
  config.log_every = 100
  config.checkpoint_every = 5000
  config.label_smoothing = 0.1
  config.ema_decay = 0.999

  config.model = config_lib.ml_collections.ConfigDict(dict(
      name='resnet50', dropout_rate=0.1, dtype='bfloat16', remat=False,
      **OFFICIAL_RESNET))

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
    opt.scale_lr_by_batch = True           # x 1024 / 256
    opt.momentum = 0.9
    opt.nesterov = True
    opt.weight_decay = 1e-4
    opt.clip_norm = 5.0
    opt.wait_steps = wait
    opt.warmup_steps = 5000
    opt.decay = 'cosine'

  config.finetune.steps = 2000             # paper: then report the final checkpoint
  config.finetune.lr = 1e-5
  config.finetune.batch_size = 512

  if args.standin or args.runlocal:
    config.data.standin = 'if_missing'     # stand-in data unless imagenet2012 is prepared
    config.eval_batch_size = 64
    config.data.max_eval_examples = 128
  if args.runlocal:
    config.data.image_size = 32
    config.model = config_lib.ml_collections.ConfigDict(dict(  # 4 bottleneck blocks: fast compile
        name='resnet', stage_sizes=(1, 1, 1, 1), num_filters=8, dropout_rate=0.1,
        dtype='float32', **OFFICIAL_RESNET))
    config.batch_size = 8
    config.mu = 2
    config.total_steps = 3
    config.eval_every = config.log_every = config.checkpoint_every = 3
    config.finetune.steps = 2
    config.finetune.batch_size = 16        # a multiple of the 8 test devices
    # No student wait/warm-up: the few smoke steps must exercise a real student step and feedback.
    for opt in (mpl.teacher_optimizer, mpl.student_optimizer):
      opt.wait_steps = opt.warmup_steps = 0
  return config
