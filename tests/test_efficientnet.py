"""EfficientNet: scaling rules, parameter counts, structure and init, forward, partitioning.

The big variants are only ever traced (`jax.eval_shape`). Compiling a whole network's random
init is slow on CPU, so the forward passes (B0 on 32x32 images, a tiny custom EfficientNet) run
on stand-in weights and the real initialisers are checked on a single block.
"""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mpl.models import DEFAULTS, MODELS, PRESETS, decay_mask, get_model, model_options
from mpl.models.efficientnet import (BLOCKS, VARIANTS, EfficientNet, MBConvBlock,
                                     SqueezeExcite, round_filters, round_repeats,
                                     stack_block_variables)
from mpl.models.wide_resnet import StochasticDepth
from jaxpr_util import traced_training_pass

# Tiny batches: XLA's compile time dominates, so compile without optimisation.
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0,
                               'xla_llvm_disable_expensive_passes': True})

# Published parameter counts with 1000 classes: B0-B7 are the well-known figures (Keras
# applications' trainable weights, torchvision, timm); all of them, B8 and L2 (timm's 480.31M) are
# tabulated exactly in the model-zoo README of github.com/FrancescoSaverioZuppichini/glasses.
PUBLISHED = {'b0': 5_288_548, 'b1': 7_794_184, 'b2': 9_109_994, 'b3': 12_233_232,
             'b4': 19_341_616, 'b5': 30_389_784, 'b6': 43_040_704, 'b7': 66_347_960,
             'l2': 480_309_308}


def _images(n=2, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(params)))


def _formula_count(width, depth, num_classes=1000):
    """Independent count: stem conv + BN; per block [expand conv + BN], depthwise conv + BN,
    squeeze-excitation (two biased 1x1 convs, reduced to a quarter of the block's input),
    project conv + BN; head conv + BN; dense with bias."""
    c_in = round_filters(32, width)
    total = 3 * 3 * 3 * c_in + 2 * c_in
    for repeats, kernel, _, expand, filters in BLOCKS:
        c_out = round_filters(filters, width)
        for _ in range(round_repeats(repeats, depth)):
            c_exp = c_in * expand
            if expand != 1:
                total += c_in * c_exp + 2 * c_exp
            total += kernel * kernel * c_exp + 2 * c_exp
            c_se = max(1, int(c_in * 0.25))
            total += c_exp * c_se + c_se + c_se * c_exp + c_exp
            total += c_exp * c_out + 2 * c_out
            c_in = c_out
    head = round_filters(1280, width)
    return total + c_in * head + 2 * head + head * num_classes + num_classes


@functools.lru_cache(maxsize=None)
def _abstract_variables(name, scan_blocks=False):
    """Shapes of the variables (bfloat16 compute, 1000 classes); traced, not initialised."""
    model = get_model(name, 1000, dtype=jnp.bfloat16, scan_blocks=scan_blocks)
    return jax.eval_shape(model.init, jax.random.key(0), _images(n=1))


def test_scaling_rules_known_values():
    # Stem / head widths of the published variants (round to multiples of 8).
    stems = {'b0': 32, 'b2': 32, 'b3': 40, 'b4': 48, 'b5': 48, 'b6': 56, 'b7': 64, 'l2': 136}
    heads = {'b0': 1280, 'b2': 1408, 'b3': 1536, 'b4': 1792, 'b5': 2048, 'b6': 2304,
             'b7': 2560, 'l2': 5504}
    for v, stem in stems.items():
        assert round_filters(32, VARIANTS[v].width) == stem, v
        assert round_filters(1280, VARIANTS[v].width) == heads[v], v
    assert round_filters(40, 1.1) == 48      # 44 rounds half up
    assert round_filters(11, 1.0) == 16      # nearest (8) loses > 10 %: one divisor more
    assert round_filters(3, 1.0) == 8        # never below the divisor
    assert round_filters(16, 4.3) == 72      # 68.8 -> 72
    # Repeats are rounded up: B0 has 16 blocks, B1 23, B7 55, L2 88.
    assert [round_repeats(s.repeats, 3.1) for s in BLOCKS] == [4, 7, 7, 10, 10, 13, 4]
    assert [round_repeats(s.repeats, 1.1) for s in BLOCKS] == [2, 3, 3, 4, 4, 5, 2]
    totals = {v: sum(round_repeats(s.repeats, VARIANTS[v].depth) for s in BLOCKS)
              for v in ('b0', 'b1', 'b7', 'l2')}
    assert totals == {'b0': 16, 'b1': 23, 'b7': 55, 'l2': 88}


def test_param_counts():
    # The independent formula reproduces every published count ...
    for v, published in PUBLISHED.items():
        assert _formula_count(VARIANTS[v].width, VARIANTS[v].depth) == published, v
    assert _formula_count(2.2, 3.6) == 87_413_142  # B8 (not a preset; same table)
    # B6-Wide (B6 depth, width 5.0): no published count found; this is the formula's.
    assert _formula_count(5.0, 2.6) == 316_649_180
    # The model itself, traced: B0 5,288,548; B7 66,347,960; L2 480,309,308.
    for v in ('b0', 'b7', 'l2'):
        assert _count(_abstract_variables(f'efficientnet_{v}')['params']) == PUBLISHED[v], v


@pytest.mark.parametrize('name,scan_blocks', [('efficientnet_b0', False),
                                               ('efficientnet_l2', False),
                                               ('efficientnet_l2', True)])
def test_every_param_logically_partitioned_and_float32(name, scan_blocks):
    """Scanned blocks' stacked weights: the same names behind an unsplit block axis."""
    variables = _abstract_variables(name, scan_blocks)
    if scan_blocks:
        assert _count(variables['params']) == PUBLISHED['l2']
    boxed = jax.tree.leaves(variables['params'],
                            is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)
    assert all(v.value.dtype == jnp.float32 for v in boxed)
    assert all(len(v.names) == v.value.ndim for v in boxed)
    specs = nn.get_partition_spec(variables)['params']
    conv_spec = P(None, None, 'conv_in', 'channels')
    for path, spec in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda s: isinstance(s, P))[0]:
        *modules, param = [k.key for k in path]
        module = modules[-1]
        if module == 'classifier':
            expected = P('features_in', 'classes') if param == 'kernel' else P('classes')
        elif module.endswith('_bn'):
            expected = P('channels')
        elif module == 'depthwise_conv':
            expected = P(None, None, None, 'channels')
        elif param == 'kernel':  # stem / expand / project / head convs, squeeze-excitation
            expected = conv_spec
        else:  # squeeze-excitation biases
            assert modules[-2] == 'se' and param == 'bias'
            expected = P('channels')
        if modules[0].startswith('blocks_'):
            expected = P(None, *expected)
        assert spec == expected, (path, spec)


def test_weight_decay_skips_exactly_the_batch_norms():
    params = nn.unbox(_abstract_variables('efficientnet_b0')['params'])
    mask = decay_mask(params)
    paths = ['/'.join(k.key for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    skipped = {p for p, v in zip(paths, jax.tree.leaves(mask)) if not v}
    bn_params = {p for p in paths if p.split('/')[-2].endswith('_bn')}
    assert skipped == bn_params
    # stem + head + 16 blocks x (depthwise, project) + 15 expanding blocks: 49 norms.
    assert len(bn_params) == 2 * 49
    assert {'block_2/se/reduce/kernel', 'block_2/se/reduce/bias',
            'block_2/depthwise_conv/kernel'} <= set(paths) - skipped


def test_b0_structure():
    params = nn.unbox(_abstract_variables('efficientnet_b0')['params'])
    assert params['stem_conv']['kernel'].shape == (3, 3, 3, 32)
    # Stage 1 (expand ratio 1) has no expand conv; squeeze-excitation reduces the block input.
    assert set(params['block_1']) == {'depthwise_conv', 'depthwise_bn', 'se', 'project_conv',
                                      'project_bn'}
    assert params['block_1']['depthwise_conv']['kernel'].shape == (3, 3, 1, 32)
    assert params['block_1']['se']['reduce']['kernel'].shape == (1, 1, 32, 8)
    assert params['block_2']['expand_conv']['kernel'].shape == (1, 1, 16, 96)
    assert params['block_2']['se']['reduce']['kernel'].shape == (1, 1, 96, 4)
    assert params['block_2']['se']['expand']['bias'].shape == (96,)
    assert params['block_4']['depthwise_conv']['kernel'].shape == (5, 5, 1, 144)
    assert params['block_16']['project_conv']['kernel'].shape == (1, 1, 1152, 320)
    assert 'block_17' not in params
    assert params['head_conv']['kernel'].shape == (1, 1, 320, 1280)
    assert params['classifier']['kernel'].shape == (1280, 1000)


def test_registry_presets_and_official_dropout():
    names = {f'efficientnet_{v}' for v in ('b0', 'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7', 'l2',
                                           'b6_wide')}
    assert names | {'efficientnet'} <= set(MODELS) and names <= set(PRESETS)
    assert get_model('efficientnet', 10) == get_model('efficientnet_b0', 10)
    b7 = get_model('efficientnet_b7', 10)
    assert (b7.width_coefficient, b7.depth_coefficient, b7.dropout_rate) == (2.0, 3.1, 0.5)
    assert b7.stochastic_depth_rate == 0.2 and (b7.bn_momentum, b7.bn_epsilon) == (0.99, 1e-3)
    wide = get_model('efficientnet_b6_wide', 10)
    assert (wide.width_coefficient, wide.depth_coefficient) == (5.0, VARIANTS['b6'].depth)
    assert DEFAULTS['efficientnet_l2'] == {'dropout_rate': 0.5}
    assert get_model('efficientnet_l2', 10, dropout_rate=0.1).dropout_rate == 0.1
    assert 'width_coefficient' not in model_options('efficientnet_b3')
    assert 'width_coefficient' in model_options('efficientnet')
    with pytest.raises(ValueError, match="'depth_coefficient'.*fixed by the preset"):
        get_model('efficientnet_b3', 10, depth_coefficient=2.0)
    assert [VARIANTS[v].resolution for v in ('b0', 'b4', 'b7', 'l2', 'b6_wide')] == [
        224, 380, 600, 800, 800]


def _stand_in_variables(shapes, seed=0):
    """Concrete variables for abstract ones without compiling the (slow) random init: kernels
    N(0, 2 / fan_in), batch-norm scales and variances 1, biases and means 0."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ('scale', 'var'):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ('bias', 'mean'):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes))


def test_b0_train_step():
    model = get_model('efficientnet_b0', 1000)
    variables = _stand_in_variables(_abstract_variables('efficientnet_b0'))
    x = _images(n=2, size=32)
    logits, updates = _jit(lambda v, x, rng: model.apply(
        v, x, train=True, rngs={'dropout': rng}, mutable=['batch_stats']))(
            variables, x, jax.random.key(1))
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    old, new = jax.tree.leaves(variables['batch_stats']), jax.tree.leaves(updates)
    assert len(old) == len(new) == 2 * 49  # mean and var of every batch norm
    assert all(np.all(np.isfinite(b)) for b in new)
    # Every variance moves, and every mean except those after the expand and head convs: their
    # input, a batch norm's output (plus a shortcut of one), has zero batch mean.
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(variables['batch_stats'])[0]]
    changed = {p for p, a, b in zip(paths, old, new) if not np.allclose(a, b)}
    assert {p for p in paths if 'var' in p or not ('expand_bn' in p or 'head_bn' in p)} <= changed



def test_layers_behave_as_the_official_ones(monkeypatch):
    """What each layer of a small EfficientNet does in a training pass: every batch norm
    normalises with its batch's statistics and epsilon 1e-3 and moves its running statistics by
    1 - 0.99 towards them; the activation is swish, once per batch norm but the blocks' project
    norms, and once in each block's squeeze-excitation (as many as the batch norms in all)."""
    model = EfficientNet(10, width_coefficient=0.25, depth_coefficient=0.5, small_images=True,
                         dropout_rate=0.0, stochastic_depth_rate=0.0)
    x = _images(n=4, size=16)
    variables = model.init(jax.random.key(0), x)
    norms, swishes = [], []
    swish = nn.swish

    def recording_swish(y):
        swishes.append(y.shape)
        return swish(y)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__' and isinstance(context.module, nn.BatchNorm):
            norms.append((context.module, np.asarray(args[0], np.float64), np.asarray(out)))
        return out

    monkeypatch.setattr(nn, 'swish', recording_swish)
    with nn.intercept_methods(interceptor):
        _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    stats = flax.traverse_util.flatten_dict(nn.unbox(updates['batch_stats']))
    assert len(norms) == len({path[:-1] for path in stats}) >= 10
    for module, inputs, outputs in norms:
        assert (module.momentum, module.epsilon) == (0.99, 1e-3)
        mean, var = inputs.mean((0, 1, 2)), inputs.var((0, 1, 2))
        path = tuple(module.scope.path)
        np.testing.assert_allclose(stats[path + ('mean',)], 0.01 * mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats[path + ('var',)], 0.99 + 0.01 * var, rtol=1e-4)
        np.testing.assert_allclose(outputs, (inputs - mean) / np.sqrt(var + 1e-3),
                                   rtol=1e-3, atol=1e-4)   # scale 1, bias 0 at init
    assert len(swishes) == len(norms)

def test_block_init():
    """B0's last block (192 -> 1152 -> 320 channels, 3x3), really initialised."""
    block = MBConvBlock(features=320, kernel=3, strides=1, expand_ratio=6,
                        stochastic_depth_rate=0.0, dtype=jnp.float32, bn_momentum=0.99,
                        bn_epsilon=1e-3)
    variables = _jit(lambda key: block.init(key, jnp.zeros((1, 1, 1, 192)), train=False))(
        jax.random.key(0))
    params = nn.unbox(variables['params'])
    # He-normal fan-out in TF's kernel layout: depthwise (TF (k, k, C, 1)) std sqrt(2 / (k * k)),
    # other convs sqrt(2 / (k * k * out)); zero biases; batch norm scale 1, bias 0.
    stds = {'expand_conv': np.sqrt(2 / 1152), 'depthwise_conv': np.sqrt(2 / 9),
            'project_conv': np.sqrt(2 / 320)}
    for module, std in stds.items():
        assert abs(np.asarray(params[module]['kernel']).std() / std - 1) < 0.03, module
    se = params['se']
    assert se['reduce']['kernel'].shape == (1, 1, 1152, 48)  # a quarter of the block's input
    assert abs(np.asarray(se['reduce']['kernel']).std() / np.sqrt(2 / 48) - 1) < 0.03
    assert abs(np.asarray(se['expand']['kernel']).std() / np.sqrt(2 / 1152) - 1) < 0.03
    assert np.all(se['reduce']['bias'] == 0) and np.all(se['expand']['bias'] == 0)
    assert np.all(params['project_bn']['scale'] == 1) and np.all(params['project_bn']['bias'] == 0)


TINY = dict(width_coefficient=0.25, depth_coefficient=0.25)  # 7 blocks, stem 8 channels


def _block_outputs(model, variables, x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
    inter = state['intermediates']
    return [inter[f'block_{i}']['__call__'][0] for i in range(1, 8)]


def test_tiny_strides_noise_bfloat16_and_sharding():
    """A tiny EfficientNet: block resolutions for ImageNet and for small images, randomness
    only in training, bfloat16 compute, and a ('data', 'model') mesh with channels split over
    'model' changing nothing."""
    x = _images(n=8, size=32)
    model = EfficientNet(10, dropout_rate=0.5, stochastic_depth_rate=0.5, **TINY)
    assert sum(round_repeats(s.repeats, 0.25) for s in BLOCKS) == 7
    variables = _stand_in_variables(jax.eval_shape(model.init, jax.random.key(0), x))

    sizes = [o.shape[1] for o in
             jax.eval_shape(lambda v: _block_outputs(model, v, x), variables)]
    assert sizes == [16, 8, 4, 2, 2, 1, 1]
    small = model.clone(small_images=True)  # the MPL code's CIFAR strides, same parameters
    sizes = [o.shape[1] for o in
             jax.eval_shape(lambda v: _block_outputs(small, v, x), variables)]
    assert sizes == [32, 32, 32, 16, 16, 8, 8]

    def train(v, x, rng):
        return model.apply(v, x, train=True, rngs={'dropout': rng}, mutable=['batch_stats'])[0]

    @_jit
    def outputs(v, key_a, key_b):  # evaluation needs no rng
        return (model.apply(v, x), model.clone(dtype=jnp.bfloat16).apply(v, x),
                train(v, x, key_a), train(v, x, key_b))

    logits, logits16, train_a, train_b = outputs(variables, jax.random.key(1),
                                                 jax.random.key(2))
    assert logits.shape == logits16.shape == (8, 10) and logits16.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(train_a))
    assert not np.allclose(train_a, train_b)  # dropout and drop-connect draw from the rng
    scale = float(np.abs(logits).max()) + 1e-3  # bfloat16 compute stays close to float32
    np.testing.assert_allclose(logits16, logits, atol=0.05 * scale)

    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    rules = [('batch', 'data'), ('height', None), ('width', None), ('channels', 'model'),
             ('features', None)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = _jit(train)  # a fresh function: the trace cache does not see the rules
        got = step(variables, x, jax.random.key(1))
        hlo = step.lower(variables, x, jax.random.key(1)).as_text()
    assert hlo.count('sharding_constraint') >= 10  # input, stem, 7 blocks, pooled features
    np.testing.assert_allclose(got, train_a, rtol=1e-4, atol=1e-4)


def test_scanned_blocks_compute_what_the_unrolled_blocks_do():
    """`scan_blocks=True` (with remat, as the L2 config runs it): each stage's repeated blocks
    in one nn.scan. With the unrolled network's block variables stacked
    (`stack_block_variables`), evaluation and training outputs, batch-norm updates and
    gradients are the unrolled network's, and the parameter count is unchanged."""
    options = dict(width_coefficient=0.25, depth_coefficient=1.0, small_images=True,
                   dropout_rate=0.0, stochastic_depth_rate=0.0)
    unrolled = EfficientNet(10, **options)
    scanned = EfficientNet(10, **options, scan_blocks=True, remat=True)
    x = _images(n=4, size=16)
    variables = _stand_in_variables(jax.eval_shape(unrolled.init, jax.random.key(0), x))
    template = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), x))
    # Stage repeats (1, 2, 2, 3, 3, 4, 1): a stage's first block stays unrolled.
    assert sorted(k for k in template['params'] if k.startswith('block')) == sorted(
        ['block_1', 'block_2', 'blocks_3_to_3', 'block_4', 'blocks_5_to_5', 'block_6',
         'blocks_7_to_8', 'block_9', 'blocks_10_to_11', 'block_12', 'blocks_13_to_15',
         'block_16'])
    assert _count(template['params']) == _count(variables['params'])
    stacked = {name: stack_block_variables(variables[name], template[name])
               for name in ('params', 'batch_stats')}
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), stacked, template)
    assert stacked['params']['blocks_13_to_15']['depthwise_conv']['kernel'].shape[0] == 3

    def outputs(model, v):
        def loss(params):  # no dropout rng: with zero rates the network must need none
            logits, updates = model.apply({**v, 'params': params}, x, train=True,
                                          mutable=['batch_stats'])
            return jnp.sum(logits ** 2), (logits, updates['batch_stats'])
        (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(v['params'])
        return model.apply(v, x), logits, stats, grads

    want = _jit(functools.partial(outputs, unrolled))(variables)
    got = _jit(functools.partial(outputs, scanned))(stacked)
    want_eval, want_train, want_stats, want_grads = want
    want = (want_eval, want_train, stack_block_variables(want_stats, template['batch_stats']),
            stack_block_variables(want_grads, template['params']))
    for name, a, b in zip(('eval', 'train', 'batch_stats', 'grads'), got, want):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 * (1 + float(np.abs(b).max())), err_msg=name), a, b)


class _DropProbe(nn.Module):
    """Stands in for a block: 2 x + (1 if its drop-connect kept the example else 0), so after
    L blocks x holds, in binary, which of them kept each example."""
    stochastic_depth_rate: float

    @nn.compact
    def __call__(self, x, train, rate=None):
        kept = StochasticDepth(self.stochastic_depth_rate)(
            jnp.ones_like(x), deterministic=not train, rate=rate) > 0
        return 2 * x + kept


def test_scanned_blocks_each_drop_at_their_own_rate_with_their_own_rng():
    """Drop-connect rates grow with the block index, also inside a scanned stage: each scan
    step gets its own rate (a scanned input) and its own 'dropout' rng."""
    rates = (0.1, 0.5, 0.8)

    class Stage(nn.Module):
        @nn.compact
        def __call__(self, x):
            return EfficientNet._scan_repeated_blocks(_DropProbe(max(rates)), x, True,
                                                      list(rates))

    n = 8000
    code = Stage().apply({}, jnp.zeros((n, 1, 1, 1)), rngs={'dropout': jax.random.key(0)})
    code = np.asarray(code).reshape(n).astype(int)
    kept = np.stack([(code >> (len(rates) - 1 - i)) & 1 for i in range(len(rates))])
    np.testing.assert_allclose(kept.mean(axis=1), 1 - np.asarray(rates), atol=0.03)
    # Independent draws: with one rng for all, the kept sets would nest (P = min, not product).
    both = np.mean(kept[1] & kept[2])
    assert abs(both - 0.5 * 0.2) < 0.03, both


@pytest.mark.parametrize('kernel,strides,size', [(3, 1, 4), (5, 2, 7), (3, 2, 8), (5, 2, 8)])
def test_depthwise_gradient_on_a_hybrid_mesh_equals_one_device(kernel, strides, size):
    """XLA partitions the depthwise kernel gradient (a batch_group_count conv) wrongly when the
    images are split over 'data' and replicated over 'model'; `depthwise_conv2d` computes it tap
    by tap on such meshes. Its gradients must equal the plain conv's on one device (even and
    uneven SAME padding, strides 1 and 2), and the tap gradient must equal it everywhere."""
    from jax.sharding import NamedSharding
    from mpl.models.efficientnet import (_depthwise_with_tap_gradient, _lax_depthwise,
                                         depthwise_conv2d)
    channels = 8
    x = jax.random.normal(jax.random.key(0), (8, size, size, channels))
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, channels))

    def grads(conv, x, k):
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides))), (0, 1))(x, k)

    expected = jax.jit(functools.partial(grads, _lax_depthwise))(x, k)
    taps = jax.jit(functools.partial(grads, _depthwise_with_tap_gradient))(x, k)
    mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        sharded = (jax.device_put(x, NamedSharding(mesh, P('data'))),
                   jax.device_put(k, NamedSharding(mesh, P())))
        hybrid = jax.jit(functools.partial(grads, depthwise_conv2d))(*sharded)
        plain = jax.jit(functools.partial(grads, _lax_depthwise))(*sharded)
    for got in (taps, hybrid):
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The mesh does trigger the XLA bug the taps avoid: the plain conv's kernel gradient comes
    # out summed over the 4 'model' devices. If this fails, XLA is fixed and the workaround in
    # efficientnet.depthwise_conv2d can go.
    np.testing.assert_allclose(plain[1], 4 * expected[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('images,size,channels,taps', [
    (8, 16, 8, False),   # 4-px strips over 'model', images over 'data'
    (8, 4, 8, False),    # maps too small for strips: whole images over both axes
    (4, 4, 8, False),    # ... and too few images for that: channels over 'model'
    (4, 4, 6, True),     # ... and channels 'model' does not divide: copies over 'model'
])
def test_depthwise_gradient_in_the_activation_layouts_equals_one_device(images, size, channels,
                                                                         taps):
    """Under the width-strip rules (mesh 2 x 4), `depthwise_conv2d` lays its input out as the
    model's activations; the plain conv (its kernel gradient is right when no mesh axis copies
    the images) is used where the layout splits the images over both axes, the taps elsewhere.
    Gradients equal one device's either way."""
    from mpl import config_lib, sharding
    from mpl.models.efficientnet import _lax_depthwise, depthwise_conv2d
    x = jax.random.normal(jax.random.key(0), (images, size, size, channels))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, channels))

    def grads(conv, x, k):
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, 2))), (0, 1))(x, k)

    expected = jax.jit(functools.partial(grads, _lax_depthwise))(x, k)
    config = config_lib.ml_collections.ConfigDict(dict(mesh=dict(data=2, model=4),
                                            spatial_partition='width'))
    mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = str(jax.make_jaxpr(functools.partial(grads, depthwise_conv2d))(x, k))
        got = jax.jit(functools.partial(grads, depthwise_conv2d))(x, k)
    # JAX's own kernel gradient is a conv with one batch group per channel; the taps are not.
    assert (f'batch_group_count={channels}' not in program) == taps
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_depthwise_tap_gradient_keeps_the_precision_its_forward_was_traced_with():
  """The custom backward is traced after the forward's `jax.default_matmul_precision` block has
  closed (MPL's h passes ask for 'highest'; exact feedback differentiates through them): the
  input-gradient conv must ask for the same precision as the forward conv."""
  from jaxpr_util import HIGHEST, matmul_precisions
  from mpl.models.efficientnet import depthwise_conv2d
  x = jax.random.normal(jax.random.key(0), (4, 9, 9, 16))
  k = jax.random.normal(jax.random.key(1), (3, 3, 1, 16))

  def loss(x, k):
    with jax.default_matmul_precision('highest'):
      return jnp.sum(depthwise_conv2d(x, k, 1) ** 2)

  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    found = matmul_precisions(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, k))
    untouched = matmul_precisions(jax.make_jaxpr(jax.grad(
        lambda x, k: jnp.sum(depthwise_conv2d(x, k, 1) ** 2), (0, 1)))(x, k))
  # The forward (also as the custom_vjp's primal body) and the input-gradient conv.
  assert len(found) >= 2 and all(p == HIGHEST for p in found), found
  assert len(untouched) == len(found) and not any(untouched), untouched


def test_depthwise_tap_gradient_in_bfloat16_and_where_it_is_used():
    from mpl.models.efficientnet import (_depthwise_with_tap_gradient, _lax_depthwise,
                                         depthwise_conv2d)
    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 16), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 16), jnp.bfloat16)
    kernel_grad = lambda conv: jax.jit(jax.grad(
        lambda k: jnp.sum(conv(x, k, 2).astype(jnp.float32) ** 2)))(k)
    taps, plain = kernel_grad(_depthwise_with_tap_gradient), kernel_grad(_lax_depthwise)
    assert taps.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(taps, np.float32), np.asarray(plain, np.float32),
                               rtol=2e-2, atol=2e-2)
    # Any 'model' axis selects the taps (so a 1 x 16 dry run compiles what 128 x 16 runs).
    for shape, uses_taps in (((8, 1), False), ((1, 8), True), ((2, 4), True)):
        mesh = jax.make_mesh(shape, ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(lambda x, k: depthwise_conv2d(x, k, 1))(x, k))
        assert ('custom_vjp' in jaxpr) == uses_taps, shape


def test_squeeze_excitation_gates_channels_by_their_spatial_mean():
  """Squeeze-excitation (the official `squeeze_and_excitation`): each channel of x is multiplied
  by sigmoid(expand(swish(reduce(mean of x over H, W)))), a gate in (0, 1) per example and
  channel; checked against numpy with non-zero biases."""
  se = SqueezeExcite(reduced_features=3, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, 6)).astype(np.float32) + 0.5
  params = nn.unbox(se.init(jax.random.key(0), x)['params'])
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  dense = lambda v, layer: v @ np.asarray(layer['kernel'][0, 0]) + np.asarray(layer['bias'])
  s = dense(x.mean(axis=(1, 2)).astype(np.float64), params['reduce'])
  gate = sigmoid(dense(s * sigmoid(s), params['expand']))
  np.testing.assert_allclose(se.apply({'params': params}, x), x * gate[:, None, None, :],
                             rtol=1e-5, atol=1e-5)


# Width 0.25, depth 0.5: stem 8 channels, stages of 1, 1, 1, 2, 2, 2, 1 blocks (10 in all);
# blocks 1, 5, 7 and 9 keep stride 1 and width, so only they have an identity shortcut.
SMALL = dict(width_coefficient=0.25, depth_coefficient=0.5)


@pytest.mark.parametrize('scan_blocks', [False, True])
def test_drop_connect_rate_grows_with_the_block_index(monkeypatch, scan_blocks):
  """Drop-connect, as both references: rate * i / num_blocks for block i (0-based) over all
  blocks, only on blocks with an identity shortcut; with `scan_blocks` each scanned block keeps
  its own rate (blocks_5_to_5 ... hold blocks 5, 7 and 9). Rate 0.4 over 10 blocks: block_1
  0, block_5 0.16, block_7 0.24, block_9 0.32."""
  model = EfficientNet(10, **SMALL, stochastic_depth_rate=0.4, scan_blocks=scan_blocks)
  rates = {}
  scan = EfficientNet._scan_repeated_blocks

  def recording_scan(block, x, train, block_rates):
    rates[block.name.replace('blocks_', 'block_').split('_to_')[0]] = block_rates
    return scan(block, x, train, block_rates)

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, StochasticDepth):
      block = next(p for p in context.module.scope.path if p.startswith('block'))
      if not block.startswith('blocks_'):
        rates[block] = [context.module.rate]
    return next_fun(*args, **kwargs)

  monkeypatch.setattr(EfficientNet, '_scan_repeated_blocks', staticmethod(recording_scan))
  traced_training_pass(model, _images(), interceptor)
  assert rates.keys() == {'block_1', 'block_5', 'block_7', 'block_9'}
  want = {'block_1': 0.0, 'block_5': 0.16, 'block_7': 0.24, 'block_9': 0.32}
  assert {k: v for k, (v,) in rates.items()} == pytest.approx(want)


def test_strides_on_a_stages_first_block_and_dropout_on_pooled_features():
  """On 64x64 images: the stem halves to 32 px; a stage's stride sits only on its first block
  (stages 4 and 6 have two blocks: their second keeps the resolution); the head's dropout acts
  on the pooled (N, C) features, before the classifier."""
  model = EfficientNet(10, **SMALL, dropout_rate=0.5)
  sizes, dropout_inputs = {}, []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, nn.Dropout):
      dropout_inputs.append(args[0].ndim)
    if context.method_name == '__call__' and context.module.name and (
        context.module.name.startswith('block_') or context.module.name == 'stem_conv'):
      sizes[context.module.name] = out.shape[1]
    return out

  traced_training_pass(model, _images(size=64), interceptor)
  assert sizes == {'stem_conv': 32, 'block_1': 32, 'block_2': 16, 'block_3': 8, 'block_4': 4,
                   'block_5': 4, 'block_6': 4, 'block_7': 4, 'block_8': 2, 'block_9': 2,
                   'block_10': 2}
  assert dropout_inputs == [2]


def test_bfloat16_compute_in_every_layer():
  """`dtype=bfloat16` computes every layer in bfloat16 (the memory and speed the L2 runs count
  on): every module's output in a training pass is bfloat16, the stem's to the depthwise convs'
  and squeeze-excitation's to the classifier's; only the returned logits are float32."""
  model = EfficientNet(10, **SMALL, dtype=jnp.bfloat16)
  x = _images(size=16)
  outputs = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.scope.path:
      outputs['/'.join(context.module.scope.path)] = out.dtype
    return out

  logits, _ = traced_training_pass(model, x, interceptor)
  assert logits.dtype == jnp.float32
  assert len(outputs) > 50 and any('depthwise_conv' in p for p in outputs)
  assert {p: d for p, d in outputs.items() if d != jnp.bfloat16} == {}


def test_classifier_init_is_the_official_uniform_one():
  """The classifier starts as in the official code (`official_dense_init`): kernel
  U(-1/sqrt(num_classes), 1/sqrt(num_classes)), filling that range, and zero bias."""
  model = EfficientNet(10, width_coefficient=0.1, depth_coefficient=0.1, small_images=True)
  jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
  params = nn.unbox(jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params'])
  w, bound = np.asarray(params['classifier']['kernel']), 1 / np.sqrt(10)
  assert w.shape == (128, 10) and np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  assert abs(w.mean()) < 0.1 * bound and np.all(params['classifier']['bias'] == 0)
