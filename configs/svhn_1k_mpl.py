r"""Meta Pseudo Labels on SVHN-1K (1,000 labels), WRN-28-2.

  python -m mpl.main --config configs/svhn_1k_mpl.py --workdir /tmp/svhn_1k_mpl
  python -m mpl.main --config configs/svhn_1k_mpl.py:seed=1 --workdir /tmp/svhn_1k_mpl_1

Paper (Pham et al. 2021): 98.01 +- 0.07 % test accuracy after the finetune stage (below); the
evaluated model is the EMA student. Run time on the paper's hardware: not stated in the paper.
Measure yours with
  python -m mpl.bench --config configs/svhn_1k_mpl.py --steps 20 \
      --config.data.standin=if_missing
(stand-in pixels where the dataset is not prepared: the speed does not depend on them) and
multiply step_ms_median by 300,000.

Data: TFDS `svhn_cropped` (73,257 train / 26,032 test, the "extra" split is not used), prepared
by the user (`python -c "import tensorflow_datasets as tfds;
tfds.builder('svhn_cropped').download_and_prepare()"` on a machine with network access, then
`--config.data.data_dir=<dir holding svhn_cropped/>`). The 1,000 labels are class-balanced (100
per class) and drawn by `data.seed`; the unlabeled pool is all training images.

Recipe: METHODS.md section 6 gives one WRN-28-2 recipe for the small benchmarks, and this config
takes it unchanged from configs/cifar10_4k_mpl.py (`wrn28_2_mpl_config`, documented there):
batch 128 + mu 7, 300k steps, SGD Nesterov lr 0.1 x batch / 256 for teacher and student, weight
decay 5e-4, teacher 5k warm-up + cosine, student 3k wait + 5k warm-up + cosine, label smoothing
0.15, dropout 0.2, UDA temperature 0.7 / threshold 0.6 / weight 8 / ramp 5k, RandAugment
magnitude 16 + 16x16 Cutout, grey (128) padding and fill, EMA 0.995.
The released code has no SVHN recipe; if the paper's appendix lists SVHN-specific values that
differ, those win (not verified here).
One deliberate difference: `augment.flip=False` (a mirrored digit is another glyph; FixMatch and
UDA do not flip SVHN). It applies to every view: the labeled weak view, the unlabeled weak and
strong views, and the finetune stage. h is measured 'paired' (`mpl.h_pass`), as in
configs/cifar10_4k_mpl.py, which says why; `--config.mpl.h_pass=official` for parity runs.

Finetune stage (paper; `config.finetune`): after MPL the EMA student is trained on the 1,000
labeled images only for 1,000 steps of SGD at a constant lr 1e-5, batch 512 (WORKDIR/finetune).
WORKDIR/summary.json reports the finetuned student as `final` (compare with 98.01) and the MPL
stage under `before_finetune`; `--config.finetune.steps=0` skips the stage.

  python -m mpl.main --config configs/svhn_1k_mpl.py:runlocal --workdir /tmp/svhn_local
A smoke test of the real pipeline: WRN-10-1 (same code, depth 10, width 1), 8 labeled + 16
unlabeled images per step, 3 MPL steps, then 2 finetune steps at batch 16; 100 labels, 128 test
images. Without a prepared svhn_cropped it trains on random stand-in images of SVHN's shapes
(`data.standin='if_missing'`): it proves the plumbing, not accuracy.

Arguments: labels (default 1000), steps (MPL steps, default 300000), seed (init, step
randomness and the labeled split), runlocal.
"""

from mpl import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, labels=1000, steps=300_000, seed=0, runlocal=False)
  cifar10_4k_mpl = config_lib.sibling_config(__file__, 'cifar10_4k_mpl.py')
  config = cifar10_4k_mpl.wrn28_2_mpl_config('svhn_cropped', args)
  config.augment.flip = False              # digits: no mirroring (see the docstring)
  return config
