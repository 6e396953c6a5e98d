r"""Fashion-MNIST (real, offline: `apt-get install -y dataset-fashion-mnist`), 28x28 padded to 32.

The official MPL CIFAR-10 recipe (WRN-28-2, SGD Nesterov, lr 0.1 x batch/256, weight decay 5e-4,
cosine, EMA 0.995 evaluated) scaled down to a step budget that runs in minutes on one GPU.

  python -m mpl.main --config configs/fashion_mnist.py:labels=-1,model=cnn --workdir /tmp/fm_all
Expected: >= 92% test accuracy with all 60,000 labels (small CNN, 10k steps). Measured on a
2-core CPU with shorter budgets: small CNN, 4,000 steps (`labels=-1,model=cnn,steps=4000`, 8.5
epochs): 92.70% EMA / 92.61% raw (6,500 s with up to three other runs on the 2 cores; about 1.9
steps/s alone); 1,400 steps: 90.99% raw / 90.91% EMA (26 min);
WRN-28-2 (`labels=-1,steps=1000`, about 2 epochs): 90.93% raw / 90.42% EMA (53 min). The full
10k-step WRN-28-2 figure needs a GPU.

  python -m mpl.main --config configs/fashion_mnist.py:labels=1000 --workdir /tmp/fm_1000
Supervised with 1000 labels (100 per class): the floor the semi-supervised methods must beat.

  python -m mpl.main --config configs/fashion_mnist.py:method=mpl,labels=1000 --workdir /tmp/fm_mpl
MPL (teacher = WRN-28-2 with UDA, student = WRN-28-2), 1000 labels; expected: MPL > UDA (the
`teacher` accuracy of an `--config.mpl.feedback=official_release` run) > supervised. The GPU
figure at this config's budget is still open (see the issue notes). A CPU study at a far
smaller budget found the opposite ordering, below.

CPU study (2 cores; `model=cnn_small`, batch 32 + 4 x 32 unlabeled, 2000 steps, 1000 labels;
test accuracy of the evaluated model, the EMA student; "teacher" = the teacher's own accuracy):
  supervised                              83.45 %                        (108 s)
  mpl first_order                         65.97 %   teacher 76.51 %      (1448 s)
  mpl exact                               63.23 %   teacher 77.02 %      (1415 s)
  mpl official_release (teacher = UDA)    67.94 %   teacher 77.36 %      (1240 s)
So at this budget supervised > UDA > MPL. The student learns only from labels sampled from the
teacher on strong views, and those were right about half the time by step 1000
(`pseudo_label_accuracy`); the MPL schedule scaled to 2000 steps gives the teacher 33 warm-up
steps and a 33-step UDA ramp. These runs used independent crops for the weak and strong views
and one jitter (the code before `augment.strong_from_weak` / `augment.jitter_after`; add
`--config.augment.strong_from_weak=False --config.augment.jitter_after=False` to repeat them):
  python -m mpl.main --config configs/fashion_mnist.py:method=mpl,labels=1000,model=cnn_small,steps=2000 \
      --workdir W --config.batch_size=32 --config.mu=4 --config.eval_every=500 \
      [--config.mpl.feedback=exact|official_release]        (method=supervised: the baseline)
  python -m launch.compare_runs W1 W2 ... --out compare.png  (the table and the curves)
The same two MPL runs with this config's official views (weak = J1(x), strong =
J2(Cutout(RA(J1(x))))): first_order 58.68 % (teacher 76.02 %), official_release 57.00 %
(teacher 77.94 %). The teachers are unchanged; the students, which see only strong views, trail
by 7-11 points more at this budget (one seed each).

What holds the teacher back at this budget is the UDA term, not the augmentation strength
(official_release runs, so the teacher is plain UDA; same setting, official views; one seed):
  UDA weight 8, ramp 33 steps (the recipe)    teacher 77.94 %   its student 57.00 %
  weight 8, RandAugment magnitude 10           teacher 75.27 %   its student 62.44 %
  weight 8, ramp 1000 steps (--config.mpl.uda_ramp_steps=1000)   79.98 % / 75.64 %
  weight 1 (--config.mpl.uda_weight=1)         teacher 83.17 %   its student 76.89 %
  supervised (EMA / raw)                       83.45 % / 83.60 %
With weight 8 the teacher's labeled loss stays at 1.3-1.4 (supervised reaches 1.0): on this
small CNN, consistency under magnitude-16 views outweighs fitting the 1000 labels. At weight 1
the labeled loss reaches 1.0 too, and UDA leads supervised through step 1500 (81.1 % vs 78.5 % raw at step 1000) and ties it at the
end. MPL at weight 1 (first_order, --config.mpl.uda_weight=1): teacher 83.48 %, student 75.04 %.
So with a teacher as good as supervised learning, the MPL feedback moves neither network by more
than one seed's noise, and the students, which learn only from the teacher's sampled labels on
strong views, trail their teachers by 6-8 points at 2000 steps.
A second seed (--config.seed=1 --config.data.seed=1) at weight 1: supervised 83.23 %, UDA teacher
81.82 % (its student 74.39 %), MPL first_order teacher 81.48 % (student 74.27 %): there UDA and
MPL trail supervised by 1.4-1.8 points, and again differ from each other by less than 0.4.
  python -m launch.compare_runs sup=W_SUP uda_w1=W_UDA mpl_w1=W_MPL --out fashion_w1.png
Three times the budget (steps=6000, weight 1, seed 0; 8,500 s a run with two at once on 2 cores):
  supervised (EMA / raw)                       85.09 % / 85.05 %   (best 85.74 % at step 3250)
  UDA teacher (official_release)               86.63 %             its student 81.61 %
  MPL first_order teacher                      86.10 %             its student 81.53 %
So with the longer budget UDA beats supervised learning (+1.5 points; the teachers lead from
step ~3500 on), the MPL teacher is 0.5 below UDA (one seed: within noise), and the students,
trained only on sampled pseudo labels of strong views, still trail supervised by 3.5 points.
Their sampled labels were right 58 % (MPL) and 73 % (UDA) of the time at the end
(`pseudo_label_accuracy`), though the teachers score 86 % on clean test images.
The paper's finetune stage on those two students (labeled data only, SGD lr 1e-5, batch 512,
1000 steps; rerun a finished workdir with --config.finetune.steps=1000 and only the stage runs,
about 1,500 s): MPL's student 81.53 -> 81.00 %, UDA's 81.61 -> 80.93 %. The loss is batch-norm
statistics, not the weights: at lr 0 (--config.finetune.lr=0) 250 steps land at 80.84 %. The
students trained with batch statistics of 1 labeled : 4 strong views, and statistics re-estimated
on weak labeled views fit them worse. At lr 1e-3 (not the paper's) the stage gives 82.73 % (MPL)
and 82.94 % (UDA): still 2 points below supervised learning.

The MPL runs above measured h the released way (`--config.mpl.h_pass=official` repeats them):
that h was mostly dropout and batch-norm noise (mpl/methods/mpl.py; `python -m launch.h_noise
WORKDIR` measures it on any MPL run). Every feedback mode at weight 1, 2000 steps, seeds 0 and 1
(--config.seed=S --config.data.seed=S), with the paired h where there is one; mean +- std of
the two seeds, test accuracy of the EMA student and of the teacher:
                                          student            teacher
  supervised                              83.34 +- 0.16
  UDA (official_release)                  75.64 +- 1.77      82.50 +- 0.95
  MPL first_order, sampled labels         74.84 +- 0.71      82.50 +- 0.88
    (the same with the official h         74.65 +- 0.54      82.48 +- 1.41)
  MPL first_order, argmax labels          76.90 +- 1.67      82.59 +- 1.07
  MPL exact                               75.69 +- 1.53      82.64 +- 1.15
  python -m launch.compare_runs sup=W0,W1 uda=W0,W1 first_order=W0,W1 exact=W0,W1 --out w1.png
(exact: --config.mpl.feedback=exact, 4,050 s a run with three others sharing the 2 cores;
argmax: --config.mpl.pseudo_label=argmax.) So at this budget the teachers are one teacher: the
feedback term (train/loss_mpl: h - b times the CE of the pseudo labels for first_order, the
surrogate of the meta-gradient for exact) stays of order 1e-3, while the labeled and UDA losses
are about 1 and 0.85 (seed 0, steps 500-1700). What moves the
student is how its labels are drawn: argmax labels of the teacher's strong-view logits were right
64 % of the time over steps 1500-2000 (sampled: 47 %; the soft labels of UDA and exact: 64 % by
argmax), and the student gains 2.1 points with them (+2.7 on seed 0, +1.4 on seed 1; teacher
unchanged), still 6.4 points below supervised learning at this budget. The paper samples.

  python -m mpl.main --config configs/fashion_mnist.py:runlocal --workdir /tmp/fm_local
A few steps of a tiny WRN on CPU, evaluated on 512 test images: a smoke test in seconds.

Arguments: method, labels (40, 250, 1000, 4000, or -1 = all), model ('wrn28_2' | 'cnn' |
'cnn_small': the CNN at half width, for CPU studies),
steps (total steps), runlocal.
"""

from mpl import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, method='supervised', labels=1000, model='wrn28_2',
                              steps=10000, runlocal=False)
  config = config_lib.base_config()
  config.method = args.method
  config.dataset = 'fashion_mnist'
  config.data.image_size = 32
  config.num_labeled = args.labels
  config.batch_size = 128
  config.mu = 7
  config.total_steps = args.steps
  config.eval_batch_size = 1000
  config.eval_every = 1000
  config.log_every = 200
  config.checkpoint_every = 2000
  config_lib.check_choice('model', args.model, ('wrn28_2', 'cnn', 'cnn_small'))
  if args.model == 'wrn28_2':
    config.model = config_lib.ml_collections.ConfigDict(dict(
        name='wrn', depth=28, width=2, dropout_rate=0.2, dtype='float32'))
  else:   # 'cnn_small': the same net at half the width, a quarter of the FLOPs (CPU studies)
    config.model = config_lib.ml_collections.ConfigDict(dict(
        name='cnn', dropout_rate=0.2, dtype='float32',
        features=(32, 64, 128) if args.model == 'cnn' else (16, 32, 64)))
  config.optimizer.lr = 0.1
  config.optimizer.scale_lr_by_batch = True   # 0.05 at batch 128, as the official code
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 500
  config.optimizer.decay = 'cosine'
  config.augment.labeled = 'weak'
  config.augment.pad_mode = 'constant'        # pad with the black background: reflect would
  config.augment.fill = 0                     # mirror garments into the border
  config.augment.strong_from_weak = True      # the official CIFAR input: weak = J1(x),
  config.augment.jitter_after = True          # strong = J2(Cutout(RA(J1(x))))
  config.ema_decay = 0.995
  # MPL (method=mpl): the official CIFAR-10-4K recipe with its schedule lengths scaled from 300k
  # steps to `steps` (teacher warm-up 5k -> steps/60, student wait 3k -> steps/100, UDA ramp).
  config.label_smoothing = 0.15
  config.mpl.student_label_smoothing = 0.15
  config.mpl.uda_ramp_steps = max(args.steps // 60, 1)
  config.mpl.teacher_optimizer.warmup_steps = args.steps // 60
  config.mpl.student_optimizer.wait_steps = args.steps // 100
  config.mpl.student_optimizer.warmup_steps = args.steps // 60
  if args.runlocal:
    if args.model == 'wrn28_2':
      config.model.depth, config.model.width = 10, 1   # WRN-10-1: same code, seconds on CPU
    config.batch_size = 16
    config.mu = 2
    config.total_steps = 4
    config.eval_batch_size = 128
    config.data.max_eval_examples = 512
    config.eval_every = 2
    config.log_every = 2
    config.checkpoint_every = 2
    for opt in (config.mpl.teacher_optimizer, config.mpl.student_optimizer):
      opt.wait_steps = opt.warmup_steps = 0   # a real student step within the smoke run
  return config
