"""Tests of mpl.data.augment: shapes and dtypes, PIL parity, geometry, policy statistics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mpl.data import augment

KEY = jax.random.key(0)
# One compilation per (op, variant, shape); the level, sign and key are traced.
apply_op = jax.jit(augment.apply_op, static_argnames=('name', 'variant'))
sample_policy = jax.jit(augment.sample_policy,
                        static_argnames=('batch', 'variant', 'magnitude', 'num_layers'))


def _image(seed, shape, lo=0, hi=256):
  return np.random.default_rng(seed).integers(lo, hi, shape).astype(np.uint8)


# ------------------------------------------------------------------ the table and the op lists


def test_range_table_is_the_docstring_table():
  for line in augment.range_table().splitlines():
    assert line in augment.__doc__, line


def test_op_lists():
  mpl, fm = augment.augment_ops('mpl'), augment.augment_ops('fixmatch')
  assert len(mpl) == 15 and len(set(mpl)) == 15 and 'Identity' not in mpl
  assert len(fm) == 14 and len(set(fm)) == 14 and 'Identity' in fm
  assert set(fm) == set(mpl) - {'Invert', 'Cutout'} | {'Identity'}
  assert set(augment.RANGES['mpl']) == set(mpl)
  assert set(augment.RANGES['fixmatch']) == set(fm)
  with pytest.raises(ValueError):
    augment.augment_ops('autoaugment')


def test_official_ranges():
  p = lambda name, level, variant: float(augment.op_param(name, level, variant))
  # MPL at the CIFAR magnitude 16 (32x32: cutout_const = translate_const = 4).
  assert p('Rotate', 16, 'mpl') == pytest.approx(48)
  assert p('ShearX', 16, 'mpl') == pytest.approx(0.48)
  assert p('TranslateY', 16, 'mpl') == pytest.approx(6.4)
  assert p('Color', 16, 'mpl') == pytest.approx(2.98)
  assert p('Posterize', 16, 'mpl') == 6
  assert p('Solarize', 16, 'mpl') == 153  # int32 409 cast to uint8.
  assert p('Solarize', 10, 'mpl') == 0
  assert p('Cutout', 16, 'mpl') == 12
  # FixMatch levels 1..9.
  assert [p('Rotate', l, 'fixmatch') for l in (1, 9)] == [3, 27]
  assert [p('Posterize', l, 'fixmatch') for l in range(1, 10)] == [4, 4, 3, 3, 2, 2, 2, 1, 1]
  assert [p('Solarize', l, 'fixmatch') for l in (1, 9)] == [231, 26]
  assert [p('TranslateX', l, 'fixmatch') for l in (1, 9)] == [1, 9]
  assert p('Brightness', 9, 'fixmatch') == pytest.approx(1.72)


# ------------------------------------------------------------------ the batched API


@functools.lru_cache(maxsize=None)
def _strong(variant):
  # MPL as its official CIFAR pipeline: grey padding, and a second flip-and-jitter at the end.
  kw = dict(pad_mode='constant', jitter_after=True) if variant == 'mpl' else {}
  return jax.jit(functools.partial(augment.strong_view, variant=variant, **kw))


@functools.lru_cache(maxsize=None)
def _randaugment(variant):
  return jax.jit(functools.partial(augment.randaugment, variant=variant, cutout_size=0))


@pytest.mark.parametrize('variant,dtype,shape', [
    ('mpl', np.uint8, (6, 16, 16, 3)),
    ('fixmatch', np.float32, (6, 12, 20, 1)),
])
def test_strong_view_shape_dtype_range_determinism(variant, dtype, shape):
  x = _image(1, shape)
  x = jnp.asarray(x if dtype == np.uint8 else x / 255.0, dtype)
  f = _strong(variant)
  a, b, c = f(KEY, x), f(KEY, x), f(jax.random.key(1), x)
  assert a.shape == x.shape and a.dtype == x.dtype
  if dtype == np.float32:
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, x)


def test_weak_view_and_cutout_keep_shape_and_dtype():
  x = jnp.asarray(_image(2, (3, 10, 14, 4)))
  weak = jax.jit(augment.weak_view, static_argnames=('pad', 'pad_mode', 'flip'))
  cut = jax.jit(augment.cutout, static_argnums=2)
  for inp in (x, x / 255.0):
    for out in (weak(KEY, inp), weak(KEY, inp, pad_mode='constant'), cut(KEY, inp, 4)):
      assert out.shape == inp.shape and out.dtype == inp.dtype


# ------------------------------------------------------------------ photometric ops against PIL


def _pil(name, im, arg):
  if name == 'AutoContrast':
    return ImageOps.autocontrast(im)
  if name == 'Equalize':
    return ImageOps.equalize(im)
  if name == 'Invert':
    return ImageOps.invert(im)
  if name == 'Posterize':
    return ImageOps.posterize(im, int(arg))
  if name == 'Solarize':
    return ImageOps.solarize(im, int(arg))
  return getattr(ImageEnhance, name)(im).enhance(arg)


def _pil_arg(name, level, variant):
  """The PIL argument from the official formulas, written out independently of RANGES."""
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return level / 10 * 1.8 + 0.1
  if name == 'Posterize':
    return int(level / 10 * 4) if variant == 'mpl' else 4 - int(level * 4 / 10)
  if name == 'Solarize':
    return int(level / 10 * 256) % 256 if variant == 'mpl' else 256 - int(level * 256 / 10)
  return None


PHOTOMETRIC = ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize', 'Color',
               'Contrast', 'Brightness', 'Sharpness')


@pytest.mark.parametrize('name', PHOTOMETRIC)
def test_photometric_op_matches_pil(name):
  images = [_image(3, (16, 20, 3)), _image(4, (16, 20, 3), 60, 150), _image(5, (12, 12, 1), 30, 90)]
  settings = [('mpl', 16), ('mpl', 5), ('fixmatch', 1), ('fixmatch', 9)]
  checked = 0
  for img in images:
    pil_img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    for variant, level in settings:
      if name not in augment.augment_ops(variant):
        continue
      ours = np.asarray(apply_op(name, jnp.asarray(img), level, variant=variant))
      ref = np.asarray(_pil(name, pil_img, _pil_arg(name, level, variant))).reshape(img.shape)
      assert ours.dtype == np.uint8 and ours.shape == img.shape
      close = np.abs(ours.astype(int) - ref.astype(int)) <= 1
      assert close.mean() >= 0.95, (name, variant, level, img.shape, close.mean())
      # Exact but for one-level ties in the blends (the augment module docstring says why).
      exact = np.mean(ours == ref)
      assert exact >= (0.99 if name in ('Color', 'Contrast', 'Sharpness') else 1), (
          name, variant, level, img.shape, exact)
      checked += 1
  assert checked >= 6


def test_contrast_of_an_image_too_large_for_an_int32_pixel_sum_matches_pil():
  # 3000 x 3000 bright pixels: 2 * sum + n exceeds 2**31, the limit of the exact integer mean.
  rows = np.random.default_rng(0).integers(170, 230, size=(3000, 1), dtype=np.uint8)
  img = np.broadcast_to(rows, (3000, 3000))[..., None].copy()
  ours = np.asarray(apply_op('Contrast', jnp.asarray(img), 16))[..., 0]
  ref = np.asarray(ImageEnhance.Contrast(Image.fromarray(img[..., 0])).enhance(16 / 10 * 1.8 + .1))
  assert np.mean(np.abs(ours.astype(int) - ref.astype(int)) <= 1) == 1
  assert np.mean(ours == ref) >= 0.99


def test_photometric_ops_on_float_images_stay_close_to_uint8():
  img = _image(6, (12, 12, 3))
  for name in PHOTOMETRIC:
    a = apply_op(name, jnp.asarray(img), 16)
    b = apply_op(name, jnp.asarray(img / 255.0, jnp.float32), 16)
    assert b.dtype == jnp.float32 and 0 <= float(b.min()) and float(b.max()) <= 1
    assert np.mean(np.abs(np.asarray(b) * 255 - np.asarray(a)) <= 1.5) >= 0.95, name


# ------------------------------------------------------------------ geometric ops on a known grid


def _coordinate_image(h, w):
  """R, G encode the pixel's x, y; B = 255 marks image pixels (the fill is grey 128)."""
  ys, xs = np.mgrid[0:h, 0:w]
  return np.stack([xs * 8, ys * 8, np.full_like(xs, 255)], -1).astype(np.uint8)


def _expected_source(name, p, h, w):
  """Where output pixel centres come from, from the textbook maps (float64)."""
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  if name == 'Rotate':  # Counter-clockwise by p degrees about the centre (y axis down).
    t = np.deg2rad(p)
    dx, dy = xs - w / 2, ys - h / 2
    sx = np.cos(t) * dx - np.sin(t) * dy + w / 2
    sy = np.sin(t) * dx + np.cos(t) * dy + h / 2
  elif name == 'ShearX':
    sx, sy = xs + p * ys, ys
  elif name == 'ShearY':
    sx, sy = xs, ys + p * xs
  elif name == 'TranslateX':
    sx, sy = xs + p, ys
  else:
    sx, sy = xs, ys + p
  return np.floor(sx).astype(int), np.floor(sy).astype(int)


@pytest.mark.parametrize('name', augment.GEOMETRIC_OPS)
def test_geometric_op_moves_grid_where_the_affine_map_says(name):
  h, w = 24, 28
  img = _coordinate_image(h, w)
  for variant, level, sign in [('mpl', 16, 1.0), ('fixmatch', 7, -1.0)]:
    p = sign * float(augment.op_param(name, level, variant, (h, w)))
    out = np.asarray(apply_op(name, jnp.asarray(img), level, variant=variant, sign=sign))
    sx, sy = _expected_source(name, p, h, w)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    got_inside = out[..., 2] == 255
    agree = np.where(inside, got_inside & (out[..., 0] == sx * 8) & (out[..., 1] == sy * 8),
                     ~got_inside & np.all(out == 128, -1))
    assert agree.mean() >= 0.99, (name, variant, agree.mean())
    assert got_inside.mean() < 1.0 or name == 'Rotate' and abs(p) < 1  # Something moved out.
    # And PIL (the reference implementation of both FixMatch codes) agrees.
    pil_img = Image.fromarray(img)
    if name == 'Rotate':
      ref = pil_img.rotate(p, fillcolor=(128, 128, 128))
    else:
      coeffs = {'ShearX': (1, p, 0, 0, 1, 0), 'ShearY': (1, 0, 0, p, 1, 0),
                'TranslateX': (1, 0, p, 0, 1, 0), 'TranslateY': (1, 0, 0, 0, 1, p)}[name]
      ref = pil_img.transform(pil_img.size, Image.AFFINE, coeffs, fillcolor=(128, 128, 128))
    assert np.all(out == np.asarray(ref), -1).mean() >= 0.99


def test_rotate_forward_direction():
  """A dot right of the centre goes up under Rotate(+90 degrees): counter-clockwise, as PIL."""
  img = np.zeros((21, 21, 1), np.uint8)
  img[10, 16] = 255
  out = np.asarray(apply_op('Rotate', jnp.asarray(img), 30, variant='mpl', fill=0))
  ys, xs = np.nonzero(out[..., 0])
  assert (ys.item(), xs.item()) == (4, 10)


# ------------------------------------------------------------------ policy statistics and wiring


@pytest.mark.parametrize('variant', ['mpl', 'fixmatch'])
def test_policy_statistics(variant):
  n, layers = 40000, 2
  pol = jax.tree.map(np.asarray, sample_policy(KEY, n, variant, num_layers=layers))
  n_ops = len(augment.augment_ops(variant))
  counts = np.bincount(pol['op'].ravel(), minlength=n_ops)
  expected = n * layers / n_ops
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
  assert np.mean(pol['sign'] > 0) == pytest.approx(0.5, abs=0.01)
  if variant == 'mpl':
    prob = pol['prob']
    assert prob.min() >= 0.2 and prob.max() <= 0.8
    assert prob.mean() == pytest.approx(0.5, abs=0.01)
    assert prob.std() == pytest.approx(0.6 / np.sqrt(12), abs=0.01)
    for lo in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7):  # P(apply | p) = p, for both layers.
      sel = (prob >= lo) & (prob < lo + 0.1)
      assert pol['apply'][sel].mean() == pytest.approx(lo + 0.05, abs=0.02)
    # One p per image: the layers' decisions are correlated, E[p^2] = 0.25 + 0.6**2 / 12 = 0.28.
    assert np.mean(pol['apply'][:, 0] & pol['apply'][:, 1]) == pytest.approx(0.28, abs=0.007)
    assert np.all(pol['level'] == 16)
  else:
    assert np.all(pol['prob'] == 0.5)
    assert pol['apply'].mean() == pytest.approx(0.5, abs=0.01)
    assert np.mean(pol['apply'][:, 0] & pol['apply'][:, 1]) == pytest.approx(0.25, abs=0.01)
    levels = np.bincount(pol['level'].astype(int).ravel(), minlength=10)
    assert levels[0] == 0 and np.all(np.abs(levels[1:] / (n * layers) - 1 / 9) < 0.01), levels


@pytest.mark.parametrize('variant', ['mpl', 'fixmatch'])
def test_policy_choices_are_independent_of_each_other(variant):
  """Each layer draws its op, its application, its level and its sign from uniforms of their
  own: an op's sign is +-1 with p = 1/2 whether or not the op is applied, every op is applied
  alike, (FixMatch) every op draws levels 1..9 alike (mean 5), and the two layers' ops are
  independent."""
  n, layers = 40000, 2
  pol = jax.tree.map(np.asarray, sample_policy(KEY, n, variant, num_layers=layers))
  positive = pol['sign'] > 0
  assert positive[pol['apply']].mean() == pytest.approx(0.5, abs=0.015)
  assert positive[~pol['apply']].mean() == pytest.approx(0.5, abs=0.015)
  n_ops = len(augment.augment_ops(variant))
  for op in range(n_ops):
    chosen = pol['op'] == op
    assert positive[chosen].mean() == pytest.approx(0.5, abs=0.03), op
    assert pol['apply'][chosen].mean() == pytest.approx(0.5, abs=0.03), op
    if variant == 'fixmatch':
      assert pol['level'][chosen].mean() == pytest.approx(5.0, abs=0.15), op
  assert np.mean(pol['op'][:, 0] == pol['op'][:, 1]) == pytest.approx(1 / n_ops, abs=0.01)


@pytest.mark.parametrize('variant', ['mpl', 'fixmatch'])
def test_randaugment_applies_the_sampled_policy(variant):
  """randaugment == the ops of sample_policy applied one by one with apply_op; on 10x18 images,
  where MPL's TranslateX (W // 8) and TranslateY (H // 8) differ, so the policy must pass each
  op the image's own (H, W)."""
  x = jnp.asarray(_image(7, (12, 10, 18, 3)))
  out = np.asarray(_randaugment(variant)(KEY, x))
  pol = jax.tree.map(np.asarray, sample_policy(KEY, x.shape[0], variant))
  ops = augment.augment_ops(variant)
  checked = 0
  for i in range(x.shape[0]):
    names = [ops[j] for j in pol['op'][i]]
    if 'Cutout' in names:  # Its position is not an apply_op argument.
      continue
    y = x[i]
    for l, name in enumerate(names):
      if pol['apply'][i, l]:
        y = apply_op(name, y, pol['level'][i, l], variant=variant, sign=pol['sign'][i, l])
    np.testing.assert_array_equal(out[i], np.asarray(y), err_msg=f'{variant} {i} {names}')
    checked += 1
  assert checked >= 6


def test_jit_and_vmap_work():
  keys = jax.random.split(KEY, 4)
  x = jnp.asarray(_image(7, (12, 10, 18, 3)))  # The shape above: _randaugment is compiled.
  for name in ('Rotate', 'Equalize'):  # Equalize has its own batching rule.
    single = jax.jit(lambda k, im, name=name: apply_op(name, im, 16, rng=k))
    batched = jax.jit(jax.vmap(single))(keys, x[:4])
    np.testing.assert_array_equal(batched, np.stack([single(keys[i], x[i]) for i in range(4)]))
  # vmap over keys of the batched policy (nested vmap) == one call per key.
  nested = jax.vmap(_randaugment('fixmatch'), in_axes=(0, None))(keys[:2], x)
  np.testing.assert_array_equal(nested[1], _randaugment('fixmatch')(keys[1], x))


# ------------------------------------------------------------------ weak view, cutout, cutmix


def test_mpl_translations_scale_with_their_own_side():
  """MPL's translate constant is image_size // 8: on a 16x40 image TranslateX (width) moves up
  to 5 px at m = 10 and TranslateY (height) 2 px."""
  assert float(augment.op_param('TranslateX', 10, 'mpl', (16, 40))) == 5
  assert float(augment.op_param('TranslateY', 10, 'mpl', (16, 40))) == 2
  # The constants are floor divisions: on a 28x44 image (Fashion-MNIST's 28 is not a multiple
  # of 8) they are 44 // 8 = 5 and 28 // 8 = 3, not 5.5 and 3.5; Cutout's is min(H, W) // 8.
  assert float(augment.op_param('TranslateX', 10, 'mpl', (28, 44))) == 5
  assert float(augment.op_param('TranslateY', 10, 'mpl', (28, 44))) == 3
  assert float(augment.op_param('Cutout', 16, 'mpl', (28, 44))) == 2 * int(1.6 * 3)


def test_weak_view_is_a_flip_and_a_crop_of_the_padded_image():
  x = _image(9, (256, 8, 8, 1))
  out = np.asarray(augment.weak_view(KEY, jnp.asarray(x), pad=2, pad_mode='reflect'))
  flips, offsets = 0, set()
  for i in range(len(x)):
    found = None
    for flip in (False, True):
      src = np.pad(x[i, :, ::-1] if flip else x[i], ((2, 2), (2, 2), (0, 0)), mode='reflect')
      for dy in range(5):
        for dx in range(5):
          if np.array_equal(src[dy:dy + 8, dx:dx + 8], out[i]):
            found = (flip, dy, dx)
    assert found is not None
    flips += found[0]
    offsets.add(found[1:])
  assert 0.4 < flips / len(x) < 0.6
  assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}  # every crop 0..2*pad
  zeros = jnp.zeros((16, 8, 8, 1), jnp.uint8)
  const = np.asarray(augment.weak_view(KEY, zeros, pad_mode='constant'))
  assert set(np.unique(const)) == {0, 128}
  no_pad = np.asarray(augment.weak_view(KEY, jnp.asarray(x), pad=0))
  assert all(np.array_equal(o, i) or np.array_equal(o, i[:, ::-1]) for o, i in zip(no_pad, x))


def assert_one_grey_square_each(out, size=6):
  """Each of the 64 black images holds one grey rectangle, cut at the border to no less than half
  of `size`, most of them whole."""
  full = 0
  for o in np.asarray(out):
    ys, xs = np.nonzero(o[..., 0])
    assert np.all(o[ys, xs] == 128)
    hgt, wid = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert len(ys) == hgt * wid and size // 2 <= hgt <= size and size // 2 <= wid <= size
    full += hgt == wid == size
  assert full > 20


def test_cutout_paints_one_clipped_square():
  assert_one_grey_square_each(augment.cutout(KEY, jnp.zeros((64, 16, 16, 2), jnp.uint8), 6))


def test_cutout_of_a_wide_image_centres_its_box_within_the_image():
  """On a 12x24 image the box's centre row is uniform on 0..11 and its column on 0..23 (not the
  other way round): every image keeps one grey square, most of them whole, and some boxes
  reach the last column."""
  out = np.asarray(augment.cutout(KEY, jnp.zeros((64, 12, 24, 1), jnp.uint8), 6))
  assert all(np.any(o) for o in out)
  assert_one_grey_square_each(out)
  assert max(np.nonzero(o[..., 0])[1].max() for o in out) == 23


def test_the_strong_view_ends_with_its_cutout():
  """strong_view's own Cutout (after RandAugment; no RandAugment layers here): on black images
  each output holds one grey square of at most cutout_size, usually whole; none without it."""
  images = jnp.zeros((64, 16, 16, 2), jnp.uint8)
  assert_one_grey_square_each(augment.strong_view(KEY, images, num_layers=0, cutout_size=6))
  assert not np.any(augment.strong_view(KEY, images, num_layers=0, cutout_size=0))


def test_the_final_cutout_is_placed_independently_of_the_policy():
  """RandAugment's closing Cutout draws its centre from uniforms of its own: on black images
  whose one MPL layer is not applied, the grey square's centre is uncorrelated with the image's
  probability p and with the op its layer drew."""
  n = 512
  out = np.asarray(augment.randaugment(KEY, jnp.zeros((n, 16, 16, 1), jnp.uint8), num_layers=1,
                                       cutout_size=4))
  pol = jax.tree.map(np.asarray, sample_policy(KEY, n, 'mpl', num_layers=1))
  skipped = np.nonzero(~pol['apply'][:, 0])[0]
  assert len(skipped) > n // 3
  centres = np.array([np.mean(np.nonzero(out[i, ..., 0]), axis=1) for i in skipped])
  assert abs(np.corrcoef(centres[:, 0], pol['prob'][skipped])[0, 1]) < 0.25
  assert abs(np.corrcoef(centres[:, 1], pol['op'][skipped, 0])[0, 1]) < 0.25
  assert abs(np.corrcoef(centres[:, 0], centres[:, 1])[0, 1]) < 0.25


def test_the_second_jitter_draws_its_own_flip():
  """strong_view with both jitters (no RandAugment, no Cutout, no padding): two independent
  flips leave about half the images mirrored; one draw used twice would undo every flip."""
  x = _image(13, (256, 8, 8, 1))
  out = np.asarray(augment.strong_view(KEY, jnp.asarray(x), num_layers=0, cutout_size=0, pad=0,
                                       jitter_before=True, jitter_after=True))
  mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
  assert all(m or np.array_equal(o, i) for m, o, i in zip(mirrored, out, x))
  assert 0.4 < np.mean(mirrored) < 0.6


def test_cutmix_mixes_labels_by_area():
  b, h, w = 32, 16, 12
  x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None] / b, (b, h, w, 3))
  y = jax.nn.one_hot(jnp.arange(b), b)
  mixed, labels = jax.jit(augment.cutmix)(KEY, x, y)
  mixed, labels = np.asarray(mixed), np.asarray(labels)
  assert mixed.shape == x.shape and labels.shape == y.shape
  np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
  own = np.asarray(x)[:, :1, :1, :1]
  for i in range(b):
    foreign = np.mean(mixed[i, ..., 0] != own[i, 0, 0, 0])
    partner = int(np.argmax(np.where(np.arange(b) == i, -1, labels[i])))
    if foreign > 0:
      assert labels[i, partner] == pytest.approx(foreign, abs=1e-6)
      assert np.all(np.isin(mixed[i], [own[i, 0, 0, 0], own[partner, 0, 0, 0]]))
  assert np.mean(labels.max(1) < 1) > 0.5


def test_cutmix_draws_a_box_of_its_own_per_image():
  """Each image draws its own lam (box sides floor(H sqrt(1 - lam)) x floor(W sqrt(1 - lam)),
  so the boxes' aspect follows the image's, W / H = 2 here) and its own centre, with y and x
  drawn independently."""
  b, h, w = 512, 24, 48
  x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 1))
  mixed, _ = jax.jit(augment.cutmix)(KEY, x, jax.nn.one_hot(jnp.arange(b), b))
  mixed = np.asarray(mixed)[..., 0]
  centres, sides = [], []
  for i in range(b):
    ys, xs = np.nonzero(mixed[i] != i)
    if not len(ys):  # no box, or its own partner
      continue
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    assert len(ys) == (y1 - y0) * (x1 - x0)  # one rectangle
    centres.append(((y0 + y1) / 2, (x0 + x1) / 2))
    if y0 > 0 and x0 > 0 and y1 < h and x1 < w and y1 - y0 >= 4:  # whole, not tiny
      sides.append((y1 - y0, x1 - x0))
  centres, sides = np.array(centres), np.array(sides)
  assert len(centres) > 0.8 * b and len(sides) > 30
  assert abs(np.corrcoef(centres[:, 0], centres[:, 1])[0, 1]) < 0.15
  assert len(set(sides[:, 0])) >= 5  # sizes vary from image to image
  assert np.median(sides[:, 1] / sides[:, 0]) == pytest.approx(w / h, abs=0.3)


def test_cps_box_mask_is_the_xor_of_its_boxes():
  b, h, w = 64, 20, 24
  mask = np.asarray(jax.jit(augment.cps_box_mask, static_argnums=(1, 2, 3))(KEY, b, h, w))
  boxes = np.asarray(jax.jit(augment.cps_boxes, static_argnums=(1, 2, 3))(KEY, b, h, w))
  assert mask.shape == (b, h, w) and mask.dtype == np.float32
  assert set(np.unique(mask)) <= {0.0, 1.0}
  assert np.all(boxes[..., :2] >= 0) and np.all(boxes[..., 2] <= h) and np.all(boxes[..., 3] <= w)
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (h * w)
  assert area.min() > 0.25 / 3 - 0.05 and area.max() < 0.5 / 3 + 0.05
  expected = np.zeros((b, h, w), bool)
  union = np.zeros((b, h, w), bool)
  for i in range(b):
    for y0, x0, y1, x1 in boxes[i]:
      expected[i, y0:y1, x0:x1] ^= True
      union[i, y0:y1, x0:x1] = True
  np.testing.assert_array_equal(mask, expected)
  assert np.any(expected != union)  # Some boxes overlap, and there they cancel.


# ------------------------------------------------------------------ views as the methods build them


def _views_config(**augment_overrides):
  from mpl import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  # RandAugment and Cutout off: what is left is the flip-and-crop bookkeeping under test.
  config.augment.update(dict(strong='mpl', num_layers=0, cutout_size=0, pad=2,
                             pad_mode='constant', fill=0))
  config.augment.update(augment_overrides)
  return config



def test_every_augment_setting_of_the_config_reaches_the_views():
  """Every key of config.augment, each off its default, is what the views are made with (a
  dropped key would silently train at the default: magnitude 16, reflect padding, grey fill)."""
  from mpl.methods import base  # pylint: disable=g-import-not-at-top
  settings = dict(strong='fixmatch', magnitude=7.0, num_layers=1, cutout_size=5, pad=3,
                  pad_mode='symmetric', flip=False, fill=40)
  config = _views_config(labeled='weak', **settings)
  x = jnp.asarray(_image(12, (16, 12, 12, 3)))
  weak_rng, strong_rng = jax.random.split(KEY)
  weak, strong = base.unlabeled_views(config, KEY, x)
  jitter = dict(pad=3, pad_mode='symmetric', flip=False, fill=40)
  np.testing.assert_array_equal(weak, augment.weak_view(weak_rng, x, **jitter))
  np.testing.assert_array_equal(strong, augment.strong_view(
      strong_rng, x, variant='fixmatch', magnitude=7.0, num_layers=1, cutout_size=5, **jitter))
  np.testing.assert_array_equal(base.labeled_view(config, KEY, x),
                                augment.weak_view(KEY, x, **jitter))
  # And each setting matters here: with any one back at its default the strong view differs.
  from mpl import config_lib  # pylint: disable=g-import-not-at-top
  defaults = config_lib.base_config().augment
  for key in settings:
    changed = _views_config(labeled='weak', **{**settings, key: defaults[key]})
    assert not np.array_equal(base.unlabeled_views(changed, KEY, x)[1], strong), key

def test_strong_view_built_on_the_weak_view_shares_its_crop():
  from mpl.methods import base  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(_image(10, (32, 8, 8, 1)))
  weak, strong = base.unlabeled_views(_views_config(strong_from_weak=True), KEY, x)
  np.testing.assert_array_equal(weak, strong)   # the official MPL CIFAR input: RA(J1(x)), J1(x)
  weak, strong = base.unlabeled_views(_views_config(strong_from_weak=False), KEY, x)
  differ = [not np.array_equal(w, s) for w, s in zip(np.asarray(weak), np.asarray(strong))]
  assert sum(differ) > len(differ) // 2       # independent flips and crops
  weak, strong = base.unlabeled_views(_views_config(strong_from_weak=True, jitter_after=True),
                                      KEY, x)
  differ = [not np.array_equal(w, s) for w, s in zip(np.asarray(weak), np.asarray(strong))]
  assert sum(differ) > len(differ) // 2       # J2 moved the strong view again


@pytest.mark.parametrize('method', ['mpl', 'pseudo_label'])
def test_methods_take_their_views_from_the_config(method):
  """flip=False, pad=0 and no RandAugment leave the unlabeled images untouched in every method."""
  from mpl import methods, models  # pylint: disable=g-import-not-at-top
  from mpl.methods import base  # pylint: disable=g-import-not-at-top
  config = _views_config(flip=False, pad=0, strong_from_weak=True, jitter_after=True)
  config.method = method
  model = models.from_config(dict(name='cnn', features=(4,)), 10)
  info = base.DataInfo(num_classes=10, mean=(0.0,), std=(1.0,), is_image=True)
  method_obj = methods.get_method(method)(config, model, info)
  method_obj.prepare = lambda images: images
  x = jnp.asarray(_image(11, (8, 8, 8, 1)))
  batch = {'labeled': {'image': x}, 'unlabeled': {'image': x}}
  _, x_w, x_s = method_obj.views(KEY, batch)
  np.testing.assert_array_equal(x_w, x)
  np.testing.assert_array_equal(x_s, x)


@pytest.mark.parametrize('method', ['mpl', 'pseudo_label'])
def test_method_views_are_the_labeled_weak_and_strong_views_in_that_order(method):
  """Method.views(rng, batch) = (labeled view, weak view, strong view), from split(rng) as
  base.labeled_view and base.unlabeled_views make them: the methods label the weak view and
  train on the strong one, and a swap would turn that consistency target around."""
  from mpl import methods, models  # pylint: disable=g-import-not-at-top
  from mpl.methods import base  # pylint: disable=g-import-not-at-top
  config = _views_config(labeled='weak', num_layers=2, cutout_size=4)
  config.method = method
  model = models.from_config(dict(name='cnn', features=(4,)), 10)
  info = base.DataInfo(num_classes=10, mean=(0.0,), std=(1.0,), is_image=True)
  method_obj = methods.get_method(method)(config, model, info)
  method_obj.prepare = lambda images: images
  x_l, x_u = jnp.asarray(_image(14, (8, 8, 8, 1))), jnp.asarray(_image(15, (16, 8, 8, 1)))
  x_l_view, x_w, x_s = method_obj.views(KEY, {'labeled': {'image': x_l},
                                              'unlabeled': {'image': x_u}})
  labeled_rng, unlabeled_rng = jax.random.split(KEY)
  weak, strong = base.unlabeled_views(config, unlabeled_rng, x_u)
  assert not np.array_equal(weak, strong)
  np.testing.assert_array_equal(x_l_view, base.labeled_view(config, labeled_rng, x_l))
  np.testing.assert_array_equal(x_w, weak)
  np.testing.assert_array_equal(x_s, strong)


@pytest.mark.parametrize('view, mesh_shape', [('strong_mpl', (8, 1)), ('strong_fixmatch', (8, 1)),
                                              ('weak', (8, 1)), ('strong_mpl', (4, 2)),
                                              ('strong_mpl', (1, 8))])
def test_views_of_a_batch_on_a_mesh_are_computed_per_device(view, mesh_shape):
  # Each device augments whole images of its own: no collective in the program (Equalize's
  # batch-wide histogram used to be all-reduced over 'data'; with 'model' > 1 every device of
  # a replica augmented all its images), and the same images as without the mesh.
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from mpl import step_profile
  fn = {'strong_mpl': functools.partial(augment.strong_view, variant='mpl', magnitude=16.),
        'strong_fixmatch': functools.partial(augment.strong_view, variant='fixmatch'),
        'weak': augment.weak_view}[view]
  key = jax.random.PRNGKey(3)
  images = jnp.asarray(_image(0, (16, 32, 32, 3)), jnp.uint8)
  odd_batch = images[:12]   # not divisible by the 8 devices: split less, or not at all
  expected = [np.asarray(jax.jit(fn)(key, x)) for x in (images, odd_batch)]
  mesh = jax.make_mesh(mesh_shape, ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    batch = jax.device_put(images, NamedSharding(mesh, P('data')))   # as the loop places it
    step = jax.jit(fn)
    out = step(key, batch)
    np.testing.assert_array_equal(np.asarray(out), expected[0])
    np.testing.assert_array_equal(np.asarray(step(key, odd_batch)), expected[1])
    kinds = {kind for kind, _ in step_profile.op_table(
        step.lower(key, batch).compile().as_text()).values()}
  assert 'collective' not in kinds, kinds
  assert out.sharding.shard_shape(out.shape)[0] == 16 // 8   # whole images, 2 per device
