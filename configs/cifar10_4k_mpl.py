r"""Meta Pseudo Labels on CIFAR-10-4K (4,000 labels), WRN-28-2: the paper's main benchmark.

  python -m mpl.main --config configs/cifar10_4k_mpl.py --workdir /tmp/cifar10_4k_mpl
  python -m mpl.main --config configs/cifar10_4k_mpl.py:seed=1 --workdir /tmp/cifar10_4k_mpl_1

Paper (Pham et al. 2021): 96.11 +- 0.07 % test accuracy after the finetune stage (below); the
evaluated model is the EMA student. Ablation on the same benchmark: supervised 82.14,
RandAugment 85.53, RandAugment + MPL 87.55, UDA 94.53, UDA + MPL 96.11.
Run time on the paper's hardware: not stated in the paper for this benchmark. A step is a
teacher forward + backward on 128 + 2 x 896 images, a student forward + backward on 128 + 896
and a student forward on 128; measure yours with
  python -m mpl.bench --config configs/cifar10_4k_mpl.py --steps 20 \
      --config.data.standin=if_missing
(stand-in pixels where the dataset is not prepared: the speed does not depend on them) and
multiply step_ms_median by 300,000 (the 1,000 finetune steps are cheap next to that). Add
`--profile DIR` to see where a step's time goes (mpl/step_profile.py). On a 2-core CPU
(float32, --steps 1 --profile_steps 1): about 110 s a step, 3.66 TFLOP by XLA's count; 87 % of
the op time in convolutions; by stage, the teacher's forward 18 %, its backward and update 47 %,
the student's step 34 %, the two labeled passes that measure h 1 %, the views 0.1 %.

Data: TFDS `cifar10`, prepared by the user (`python -c "import tensorflow_datasets as tfds;
tfds.builder('cifar10').download_and_prepare()"` on a machine with network access, then
`--config.data.data_dir=<dir holding cifar10/>`). The 4,000 labels are class-balanced (400 per
class) and drawn by `data.seed` (saved in WORKDIR/labeled_split.json); as in the official code
the unlabeled pool is all 50,000 training images.

The official recipe (METHODS.md section 6; google-research/meta_pseudo_labels README flags and
data_utils.py), built by `wrn28_2_mpl_config` below and shared with configs/svhn_1k_mpl.py:
  batch 128 labeled + mu 7 (896 unlabeled, one weak and one strong view each), 300k steps;
  teacher and student: SGD Nesterov 0.9, lr 0.1 x batch / 256 = 0.05, coupled weight decay 5e-4
  (every variable but batch norm's, biases too), no clipping; teacher: 5k warm-up then cosine;
  student: lr 0 for 3k steps, 5k warm-up, cosine; label smoothing 0.15 (teacher's labeled loss,
  and the student's loss on pseudo labels as the official code applies it); dense dropout 0.2;
  UDA temperature 0.7, threshold 0.6, weight 8 with a 5k-step linear ramp; RandAugment magnitude
  16, 2 layers, 16x16 Cutout; student EMA 0.995 with decay min(0.995, (t+1)/(t+10)), evaluated.
  Weak view: flip + 4-pixel pad-and-crop with the padding filled with grey 128
  (`augment.pad_mode='constant'`, `augment.fill=128`: the official `_flip_and_jitter(x, 128)`;
  the same grey fills RandAugment's geometric ops and the Cutout box). As the official input,
  the strong view is built on the weak view's own flip and crop and jitters once more after
  Cutout: weak = J1(x), strong = J2(Cutout(RA(J1(x)))) (`augment.strong_from_weak`,
  `augment.jitter_after`).

One deliberate difference from the released code: h, the teacher's feedback, is measured
'paired' (`mpl.h_pass`, the default; see mpl/methods/mpl.py): f_old and f_new come from two
passes on the labeled images with the same dropout masks. The released code takes f_old from the
student's training pass and f_new from a new pass with new masks, which buries the step's effect
in dropout and batch-norm noise; `--config.mpl.h_pass=official` measures it that way, for parity
runs.

Finetune stage (paper; `config.finetune`): after the 300k MPL steps the EMA student is trained
on the 4,000 labeled images only (weak view, cross-entropy with the same label smoothing 0.15,
dropout on, no EMA) for 1,000 steps of SGD Nesterov 0.9 at a constant lr 1e-5, batch 512, in
WORKDIR/finetune. WORKDIR/summary.json then reports the finetuned student as `final` (the
number to compare with 96.11) and the MPL stage's results under `before_finetune`.
`--config.finetune.steps=0` skips the stage.

  python -m mpl.main --config configs/cifar10_4k_mpl.py:runlocal --workdir /tmp/c10_local
A smoke test of the real pipeline: WRN-10-1 (same code, depth 10, width 1), 8 labeled + 16
unlabeled images per step, 3 MPL steps, then 2 finetune steps at batch 16; 100 labels, 128 test
images. Without a prepared cifar10 it trains on random stand-in images of CIFAR-10's shapes
(`data.standin='if_missing'`): it proves the plumbing, not accuracy.

Arguments: labels (default 4000), steps (MPL steps, default 300000), seed (init, step
randomness and the labeled split), runlocal.
"""

from mpl import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, labels=4000, steps=300_000, seed=0, runlocal=False)
  return wrn28_2_mpl_config('cifar10', args)


def wrn28_2_mpl_config(dataset, args):
  """The official small-benchmark MPL recipe (WRN-28-2) on `dataset`; see the module docstring.

  `args`: the parsed labels, steps, seed and runlocal arguments. Also used by
  configs/svhn_1k_mpl.py.
  """
  config = config_lib.base_config()
  config.method = 'mpl'
  config.dataset = dataset
  config.num_labeled = args.labels
  config.seed = args.seed
  config.data.seed = args.seed
  config.data.exclude_labeled = False      # official: unlabeled = all training images

  config.batch_size = 128
  config.mu = 7
  config.total_steps = args.steps
  config.eval_batch_size = 1000
  config.eval_every = 2000
  config.log_every = 100
  config.checkpoint_every = 2000
  config.label_smoothing = 0.15
  config.ema_decay = 0.995

  config.model = config_lib.ml_collections.ConfigDict(dict(
      name='wrn', depth=28, width=2, dropout_rate=0.2, dtype='float32',
      remat=False))  # WRN-28-2; remat=True trades compute for activation memory

  config.augment.labeled = 'weak'          # flip + 4-pixel pad-and-crop
  config.augment.flip = True
  config.augment.pad = 4
  config.augment.pad_mode = 'constant'     # official: pad with grey, not reflect
  config.augment.fill = 128                # grey of the padding, geometric ops and Cutout
  config.augment.strong = 'mpl'
  config.augment.magnitude = 16.0
  config.augment.num_layers = 2
  config.augment.cutout_size = 16
  config.augment.strong_from_weak = True   # official: strong = J2(Cutout(RA(J1(x)))), weak = J1(x)
  config.augment.jitter_after = True

  mpl = config.mpl
  mpl.feedback = 'first_order'
  mpl.pseudo_label = 'sample'
  mpl.baseline_decay = 0.99
  mpl.student_label_smoothing = 0.15
  mpl.uda_weight = 8.0
  mpl.uda_ramp_steps = 5000
  mpl.uda_temperature = 0.7
  mpl.uda_threshold = 0.6
  for opt, wait in ((mpl.teacher_optimizer, 0), (mpl.student_optimizer, 3000)):
    opt.name = 'sgd'
    opt.lr = 0.1
    opt.scale_lr_by_batch = True           # 0.05 at batch 128
    opt.momentum = 0.9
    opt.nesterov = True
    opt.weight_decay = 5e-4
    opt.clip_norm = 0.0
    opt.wait_steps = wait
    opt.warmup_steps = 5000
    opt.decay = 'cosine'

  config.finetune.steps = 1000             # paper: then report the final checkpoint
  config.finetune.lr = 1e-5
  config.finetune.batch_size = 512

  if args.runlocal:
    config.data.standin = 'if_missing'
    config.num_labeled = 100               # the stand-in set has 512 images
    config.model.depth, config.model.width = 10, 1   # WRN-10-1: same code, seconds on CPU
    config.batch_size = 8
    config.mu = 2
    config.total_steps = 3
    config.eval_batch_size = 64
    config.data.max_eval_examples = 128
    config.eval_every = config.log_every = config.checkpoint_every = 3
    config.finetune.steps = 2
    # No student wait/warm-up: the few smoke steps must exercise a real student step and feedback.
    for opt in (config.mpl.teacher_optimizer, config.mpl.student_optimizer):
      opt.wait_steps = opt.warmup_steps = 0
    config.finetune.batch_size = 16        # a multiple of the 8 test devices
  return config
