r"""Digits (scikit-learn's 8x8 handwritten digits, 1,438 train / 359 test), MLP, CPU-sized.

  python -m mpl.main --config configs/digits.py:method=supervised,labels=-1 \
      --workdir /tmp/digits_all
Expected: ~97% test accuracy with all labels, in about 15 s on a CPU (2000 steps).

  python -m mpl.main --config configs/digits.py:labels=100 --workdir /tmp/digits_100
Expected: ~85-90% with 100 labels (10 per class).

Arguments: method, labels (-1 = all), model ('mlp' | 'cnn'), runlocal (a few steps).
"""

from mpl import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, method='supervised', labels=100, model='mlp',
                              runlocal=False)
  config = config_lib.base_config()
  config.method = args.method
  config.dataset = 'digits'
  config.num_labeled = args.labels
  config.batch_size = 64
  config.mu = 4
  config.total_steps = 2000
  config.eval_batch_size = 120
  config.eval_every = 250
  config.log_every = 250
  config.checkpoint_every = 1000
  config_lib.check_choice('model', args.model, ('mlp', 'cnn'))
  if args.model == 'mlp':
    # Three layers (two hidden + classifier), as the mutual-learning coupling experiment uses.
    config.model = config_lib.ml_collections.ConfigDict(dict(
        name='mlp', hidden_sizes=(256, 256), activation='relu', initializer='lecun', dropout_rate=0.1))
  else:
    config.model = config_lib.ml_collections.ConfigDict(dict(name='cnn', dropout_rate=0.1))
  config.optimizer.lr = 0.05
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 100
  config.ema_decay = 0.99
  if args.runlocal:
    config.total_steps = 10
    config.eval_every = 5
    config.log_every = 5
    config.checkpoint_every = 5
  return config
