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
