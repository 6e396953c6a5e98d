r"""TwoMoons, the MPL paper's toy (Figure 1): 2000 points, 2x8 sigmoid MLPs, SGD 0.1.

  python -m mpl.main --config configs/two_moons.py:method=supervised,labels=2000 \
      --workdir /tmp/moons_sup_all
Expected: 100% on the 2000 points, in about 30 s on a CPU (10k steps).

  python -m mpl.main --config configs/two_moons.py:method=supervised,labels=6 --workdir /tmp/m6
The paper's setting (6 labels, 3 per moon): supervised finds a poor boundary (~75-90%).

Arguments: method (see mpl/methods), labels (-1 = all 2000), noise, runlocal (a few steps).
Unpublished in the paper, chosen here: noise 0.1, 10k steps, momentum 0.9, batch 64.
Pseudo Labels (method=pseudo_label) as in the paper's figure: offline, one round (a teacher trained
on the 6 labels for 5k steps, then frozen while the student learns its argmax labels for 5k).

The paper's claim (MPL finds the right boundary, supervised does not, Pseudo Labels is worse) does
NOT reproduce here, with these defaults or any setting tried. The figure and the success rates
(a run succeeds at >= 99% on the 2000 points; seeds 0-9, config.seed = config.data.seed = seed):

  python -m launch.two_moons_figure --out two_moons.png --seeds 10     # about 10 min, 1 CPU core
  (its output is docs/two_moons.png)

  defaults (10k steps, momentum 0.9)  supervised 0/10 (mean 81.8%), pseudo_label 0/10 (81.7%),
                                      mpl 0/10 (81.7%); best single run of any method 86.3%.
  All three draw the same near-linear boundary (seed 0: 84.0%, 84.4%, 83.9%).

Sweep (10 seeds each, mpl unless named; every line 0/10 successes; mean accuracy in brackets):
  momentum 0 for teacher and student (the paper's plain "SGD lr 0.1"): 10k steps (81.8%), 50k
  (81.7%); supervised / pseudo_label with momentum 0 (81.8% / 82.0%), supervised 50k (81.8%);
  feedback 'exact' (82.2%), 'exact' + momentum 0 (82.2%); pseudo labels argmax instead of sampled
  (81.8%); student lr 1.0 (81.8%), 5.0 without momentum (81.8%); teacher lr 0.01 (81.8%); mu 8
  (81.7%); no moving baseline, baseline_decay 1.0 (81.7%; with student lr 1.0, 50k: 81.7%; with
  argmax labels too: 81.1%); 200k steps (81.7%); label smoothing 0.2 (82.5%; supervised 82.5%);
  noise 0.05 (82.1%; supervised 82.2%), noise 0.15 (81.4%; supervised 81.4%); 12 labels on
  noise-free moons (`labels=12,noise=0.0`, seeds 0-4 only, 0/5: 84.3%; supervised 84.9%);
  slow teacher: lr 0.01 without momentum and student lr 1.0 without momentum, 50k (82.1%);
  'exact' with that slow teacher, 50k (82.0%); UDA on the teacher (not the paper's toy):
  uda_weight 1 (82.4%), 8 at 30k steps (81.3%), and the same with feedback 'official_release',
  i.e. no MPL feedback at all (82.4%, 82.2%).
  A teacher taught by the student's feedback alone, as in the paper's section 2
  (--config.mpl.teacher_labeled_weight=0): 'first_order' (53.0%; 8 seeds at 50%), 'exact' (50.0%):
  from the U(-0.1, 0.1) init the teacher says 1/2 everywhere, its sampled labels are coin flips,
  and h stays ~1e-5. Settings where the feedback dominates the teacher break the student instead: 'exact',
  teacher lr 0.01, student lr 1.0 (50.6%); teacher lr 0.001 without momentum, 50k (50.0%).
Per seed, MPL's accuracy stays within about 1 point of supervised learning's: the 6 labeled points
(and the initialisation) fix the boundary, a near-linear cut through both moons.

Why: the teacher's labeled cross-entropy fits the 6 points within ~1k steps (loss 1e-3 at step
1000, seed 0); the student then agrees with them too, and its labeled loss f, from which the
feedback h = f_old - f_new is made, is ~1e-4 for ANY boundary consistent with the 6 points. The
feedback term is then 1e-4 to 1e-5 of the labeled term (h ~ 1e-7; logged as train/h and
train/loss_mpl), so nothing in the objective prefers the boundary that follows the moons; while f
is still large (the first few hundred steps) the feedback can only move the labels towards those of
the labeled points (the supervised signal again). No bug was found in mpl/methods/mpl.py: the sign
and the first-order form of h match the paper (h > 0 when the student's labeled loss fell), and the
"exact" second-order feedback behaves the same. The paper's caption calls its figure "conceptual
behaviors" and publishes no step count, momentum or noise.
"""

from mpl import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, method='supervised', labels=6, noise=0.1, runlocal=False)
  config = config_lib.base_config()
  config.method = args.method
  config.dataset = 'two_moons'
  config.data.noise = args.noise
  config.num_labeled = args.labels
  config.batch_size = 64
  config.mu = 1
  config.total_steps = 10000
  config.eval_batch_size = 1000
  config.eval_every = 1000
  config.log_every = 500
  config.checkpoint_every = 5000
  # The paper's networks: 2 hidden layers of 8 sigmoid units, init U(-0.1, 0.1).
  config.model = config_lib.ml_collections.ConfigDict(dict(
      name='mlp', hidden_sizes=(8, 8), activation='sigmoid', initializer='uniform', init_scale=0.1))
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.decay = 'constant'
  config.augment.strong = 'none'    # points, not images: no views
  # Pseudo Labels: teacher for total_steps // 2, then one student round on its hard labels.
  config.pseudo_label.rounds = 1
  # MPL: the same networks and SGD 0.1 for teacher and student, no UDA, no schedules.
  config.mpl.uda_weight = 0.0
  for opt in (config.mpl.teacher_optimizer, config.mpl.student_optimizer):
    opt.update(dict(lr=0.1, scale_lr_by_batch=False, momentum=0.9, weight_decay=0.0,
                    wait_steps=0, warmup_steps=0, decay='constant'))
  if args.runlocal:
    config.total_steps = 20
    config.eval_every = 10
    config.log_every = 5
    config.checkpoint_every = 10
  return config
