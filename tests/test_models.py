"""Model zoo: shapes and dtypes, official WRN architecture, randomness, registry, sharding."""
import functools
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mpl import config_lib
from mpl.models import (MODELS, MLP, PRESETS, ResNet, ResNet50, WideResNet, decay_mask,
                        from_config, get_model, is_decayed, model_options)
from mpl.models.cnn import CNN
from mpl.models.wide_resnet import StochasticDepth, stochastic_depth_rates
from jaxpr_util import traced_training_pass


def _canonical_names():
    """Maps each name to the most specific name building the same module (e.g. wrn28 and wrn
    build what wrn28_2 builds), so that each distinct model is initialised and run once."""
    kept, canonical = {}, {}  # kept: canonical name -> module
    for name in sorted(MODELS, key=lambda n: (-len(PRESETS.get(n, {})), n)):
        model = get_model(name, 10)
        canonical[name] = next((k for k, m in kept.items() if m == model), name)
        kept.setdefault(canonical[name], model)
    return canonical


CANONICAL = _canonical_names()
# EfficientNets are tested in tests/test_efficientnet.py: initialising and running B7 or L2 here
# would take minutes.
TESTED_ELSEWHERE = {name for name in MODELS if name.startswith('efficientnet')}
FORWARD_MODELS = sorted(set(CANONICAL.values()) - TESTED_ELSEWHERE)


def _images(n=2, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(params)))


def _train_apply(model, variables, x, rng=None):
    """Training-mode logits and the updated batch statistics ({} for nets without BN)."""
    rngs = {} if rng is None else {'dropout': rng}
    mutable = ['batch_stats'] if 'batch_stats' in variables else False
    out = model.apply(variables, x, train=True, rngs=rngs, mutable=mutable)
    return out if mutable else (out, {})


# These tests run tiny batches, so XLA's compile time dominates: compile without optimisation.
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0,
                               'xla_llvm_disable_expensive_passes': True})


def _initialised(name):
    return _initialised_once(CANONICAL[name])


@functools.lru_cache(maxsize=None)
def _initialised_once(name):
    model = get_model(name, 10)
    return model, _jit(model.init)(jax.random.key(0), _images())


@pytest.mark.parametrize('name', FORWARD_MODELS)
def test_forward_train_eval_and_bfloat16(name):
    model, variables = _initialised(name)
    model16 = get_model(name, 10, dtype=jnp.bfloat16)  # same float32 parameters

    @_jit
    def run(variables, x, rng):
        train, updates = _train_apply(model, variables, x, rng)
        train16, _ = _train_apply(model16, variables, x, rng)
        return model.apply(variables, x), train, updates, train16

    logits, train, updates, train16 = run(variables, _images(seed=1), jax.random.key(2))
    for out in (logits, train, train16):
        assert out.shape == (2, 10) and out.dtype == jnp.float32
        assert np.all(np.isfinite(out))
    if 'batch_stats' in variables:  # train mode updates the running statistics
        old, new = jax.tree.leaves(variables['batch_stats']), jax.tree.leaves(updates)
        assert any(not np.allclose(a, b) for a, b in zip(old, new))
    scale = float(np.abs(train).max()) + 1e-3  # bfloat16 compute stays close to float32
    np.testing.assert_allclose(train16, train, atol=0.1 * scale)


def _wrn_param_count(k, stem_width, depth=28, num_classes=10, in_channels=3):
    """Independent count: pre-activation WRN, 3x3 convs without bias, BN scale+bias, 1x1
    projection shortcut whenever the block changes width or stride, final BN and dense."""
    n = (depth - 4) // 6
    total = 3 * 3 * in_channels * stem_width
    c_in = stem_width
    for stage, c in enumerate((16 * k, 32 * k, 64 * k)):
        for b in range(n):
            total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c
            if c_in != c or (stage > 0 and b == 0):
                total += c_in * c
            c_in = c
    return total + 2 * c_in + c_in * num_classes + num_classes


def test_param_counts():
    # The formula reproduces the well-known WRN-28-2 figure (16-channel stem): 1,467,610.
    assert _wrn_param_count(2, stem_width=16) == 1_467_610
    # The official MPL WRN-28-k has a 16k-channel stem, which makes block_1 an identity block.
    shapes = jax.eval_shape(get_model('wrn28_2', 10).init, jax.random.key(0), _images())
    assert _count(shapes['params']) == _wrn_param_count(2, stem_width=32) == 1_472_170
    shapes = jax.eval_shape(get_model('wrn28_8', 10).init, jax.random.key(0), _images())
    assert _count(shapes['params']) == _wrn_param_count(8, stem_width=128) == 23_485_066
    shapes = jax.eval_shape(get_model('resnet50', 1000).init, jax.random.key(0),
                            jnp.zeros((1, 224, 224, 3)))
    assert _count(shapes['params']) == 25_557_032  # torchvision resnet50: 25.56M


def test_official_wrn_structure_and_init():
    model, variables = _initialised('wrn28_2')
    params = nn.unbox(variables['params'])
    assert (model.bn_momentum, model.bn_epsilon, model.leaky_relu_slope) == (0.99, 1e-3, 0.2)
    assert params['stem']['kernel'].shape == (3, 3, 3, 32)  # 16k channels, no BN after it
    assert set(params['stem']) == {'kernel'}
    blocks = [k for k in params if k.startswith('block_')]
    assert len(blocks) == 12
    with_projection = sorted(b for b in blocks if 'shortcut_conv' in params[b])
    assert with_projection == ['block_5', 'block_9']
    assert params['block_5']['shortcut_conv']['kernel'].shape == (1, 1, 32, 64)
    assert set(params['block_1']) == {'bn_1', 'conv_1', 'bn_2', 'conv_2'}
    assert set(params['block_1']['conv_1']) == {'kernel'}  # convs have no bias
    assert params['block_12']['conv_2']['kernel'].shape == (3, 3, 128, 128)

    # He-normal fan-out: std sqrt(2 / (3 * 3 * 128)).
    w = np.asarray(params['block_12']['conv_2']['kernel'])
    assert abs(w.std() / np.sqrt(2 / (9 * 128)) - 1) < 0.03
    # Official dense init: U(-1/sqrt(num_classes), 1/sqrt(num_classes)), zero bias.
    w = np.asarray(params['classifier']['kernel'])
    bound = 1 / np.sqrt(10)
    assert w.shape == (128, 10) and np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert np.all(params['classifier']['bias'] == 0)



def test_wrn_layers_behave_as_the_official_ones(monkeypatch):
    """What each layer of a (small) WRN does in a training pass, not only its fields: every
    batch norm normalises with its batch's statistics and epsilon 1e-3 and moves its running
    statistics by 1 - 0.99 towards them; every activation is a leaky ReLU of slope 0.2; dropout
    acts on the pooled features, before the classifier."""
    model = get_model('wrn', 10, depth=10, width=1, dropout_rate=0.5)
    x = _images()
    variables = model.init(jax.random.key(0), x)
    norms, slopes, dropout_inputs = [], [], []
    leaky_relu = nn.leaky_relu

    def recording_leaky_relu(y, negative_slope=0.01):
        slopes.append(negative_slope)
        return leaky_relu(y, negative_slope=negative_slope)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__' and isinstance(context.module, nn.BatchNorm):
            norms.append((context.module, np.asarray(args[0], np.float64), np.asarray(out)))
        if context.method_name == '__call__' and isinstance(context.module, nn.Dropout):
            dropout_inputs.append(np.ndim(args[0]))
        return out

    monkeypatch.setattr(nn, 'leaky_relu', recording_leaky_relu)
    with nn.intercept_methods(interceptor):
        _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                 rngs={'dropout': jax.random.key(1)})
    stats = flax.traverse_util.flatten_dict(nn.unbox(updates['batch_stats']))
    assert len(norms) == len({path[:-1] for path in stats}) >= 5
    for module, inputs, outputs in norms:
        assert (module.momentum, module.epsilon) == (0.99, 1e-3)
        mean, var = inputs.mean((0, 1, 2)), inputs.var((0, 1, 2))
        path = tuple(module.scope.path[1:]) if module.scope.path[0] == 'batch_stats' else tuple(
            module.scope.path)
        np.testing.assert_allclose(stats[path + ('mean',)], 0.01 * mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats[path + ('var',)], 0.99 + 0.01 * var, rtol=1e-4)
        np.testing.assert_allclose(outputs, (inputs - mean) / np.sqrt(var + 1e-3),
                                   rtol=1e-3, atol=1e-4)   # scale 1, bias 0 at init
    assert slopes and all(s == 0.2 for s in slopes), slopes
    assert dropout_inputs == [2]

def test_resnet50_zero_init_last_bn_scale():
    _, variables = _initialised('resnet50')
    params = nn.unbox(variables['params'])
    for block in [k for k in params if k.startswith('block_')]:
        assert np.all(params[block]['bn_3']['scale'] == 0)
        assert np.all(params[block]['bn_2']['scale'] == 1)
    assert np.asarray(params['classifier']['kernel']).std() == pytest.approx(0.01, rel=0.05)


def test_resnet_official_mpl_settings():
    """The ImageNet MPL configs' OFFICIAL_RESNET: every BN scale 1, the classifier U(+-1/sqrt(C)),
    and TF's SAME padding, whose 7x7/2 stem pads (2, 3) on a 32-pixel side: output row 0 sees
    input rows -2..4 (symmetric padding: -3..3)."""
    configs = os.path.join(os.path.dirname(__file__), '..', 'configs')
    official = config_lib.sibling_config(os.path.join(configs, 'x.py'),
                                         'imagenet10_mpl.py').OFFICIAL_RESNET
    model = ResNet(10, stage_sizes=(1, 1), num_filters=8, **official)
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    params = nn.unbox(variables['params'])
    assert all(np.all(np.asarray(p['bn_3']['scale']) == 1)
               for name, p in params.items() if name.startswith('block_'))
    w, bound = np.abs(np.asarray(params['classifier']['kernel'])), 1 / np.sqrt(10)
    assert w.max() <= bound and w.max() > 0.9 * bound
    stem = {}
    for padding in ('SAME', 'symmetric'):
        net = ResNet(10, stage_sizes=(1, 1), num_filters=8, **{**official, 'padding': padding})
        outputs = [net.apply(variables, image, capture_intermediates=True,
                             mutable=['intermediates'])[1]['intermediates']['stem_conv']
                   ['__call__'][0] for image in (x, x.at[0, 4, 4, 0].set(1.0))]
        stem[padding] = np.abs(np.asarray(outputs[1] - outputs[0]))[0, 0, 0].max()
    assert stem['SAME'] > 0 and stem['symmetric'] == 0


def test_stochastic_depth_module():
    x = jnp.ones((1000, 2, 2, 3))
    layer = StochasticDepth(0.25)
    y = layer.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(0)})
    per_example = np.asarray(y).reshape(1000, -1)
    assert np.all(per_example == per_example[:, :1])  # whole example kept or dropped
    assert set(np.unique(per_example)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((per_example[:, 0] > 0).mean() - 0.75) < 0.05
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(StochasticDepth(0.0).apply({}, x, deterministic=False), x)
    assert stochastic_depth_rates(0.2, 4) == pytest.approx([0.0, 0.05, 0.1, 0.15])


NOISY_MODELS = {
    'wrn_stochastic_depth': lambda r: WideResNet(10, depth=16, width=1, stochastic_depth_rate=r),
    'wrn_dropout': lambda r: WideResNet(10, depth=10, width=1, dropout_rate=r),
    'resnet_stochastic_depth': lambda r: ResNet(10, stage_sizes=(2, 1), num_filters=8,
                                                stochastic_depth_rate=r),
    'cnn_dropout': lambda r: CNN(10, features=(8, 8, 8), dropout_rate=r),
    'mlp_dropout': lambda r: MLP(10, hidden_sizes=(32,), dropout_rate=r),
}


@pytest.mark.parametrize('kind', NOISY_MODELS)
def test_randomness_only_in_training(kind):
    x = _images(n=8, size=8)
    noisy, clean = NOISY_MODELS[kind](0.5), NOISY_MODELS[kind](0.0)
    variables = _jit(noisy.init)(jax.random.key(0), x)
    # ResNet zero-initialises each branch's last BN scale, which would make a dropped branch
    # indistinguishable from a kept one; give the branches some output.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if "['bn_3']['scale']" in jax.tree_util.keystr(path)
        else v,
        variables)
    evaluate = _jit(lambda v, rng: noisy.apply(v, x, rngs={'dropout': rng}))
    train = _jit(lambda v, rng: _train_apply(noisy, v, x, rng)[0])
    train_clean = _jit(lambda v, rng: _train_apply(clean, v, x, rng)[0])
    key_a, key_b = jax.random.key(1), jax.random.key(2)

    np.testing.assert_array_equal(evaluate(variables, key_a), evaluate(variables, key_b))
    np.testing.assert_array_equal(train(variables, key_a), train(variables, key_a))
    assert not np.allclose(train(variables, key_a), train(variables, key_b))
    # Rates 0: the dropout rng makes no difference, and training runs without one.
    np.testing.assert_array_equal(train_clean(variables, key_a), train_clean(variables, key_b))
    assert jax.eval_shape(lambda v: _train_apply(clean, v, x)[0], variables).shape == (8, 10)


def test_registry_errors_and_presets():
    with pytest.raises(ValueError, match="valid names.*'resnet50'.*'wrn28_2'"):
        get_model('wrn28_3', 10)
    with pytest.raises(ValueError, match="'widht'.*valid options.*'dropout_rate'"):
        get_model('wrn28', 10, widht=4)
    with pytest.raises(ValueError, match="'width'.*fixed by the preset"):
        get_model('wrn28_2', 10, width=8)
    with pytest.raises(ValueError, match="'depth'"):
        get_model('wrn28', 10, depth=40)
    assert get_model('wrn28', 10) == get_model('wrn28_2', 10)
    assert get_model('wrn28', 10, width=8) == get_model('wrn28_8', 10)
    assert 'stochastic_depth_rate' in model_options('resnet50')
    assert 'stage_sizes' not in model_options('resnet50')
    assert set(model_options('mlp')) == {'hidden_sizes', 'activation', 'initializer',
                                         'init_scale', 'dropout_rate', 'dtype'}
    with pytest.raises(ValueError, match='activation'):
        get_model('mlp', 2, activation='swish').init(jax.random.key(0), jnp.zeros((1, 2)))


def test_mlp_uniform_init_and_flattening():
    model = get_model('mlp', 2, initializer='uniform')  # the paper's TwoMoons network
    params = nn.unbox(_jit(model.init)(jax.random.key(0), jnp.zeros((1, 2)))['params'])
    assert params['hidden_0']['kernel'].shape == (2, 8)
    assert params['classifier']['kernel'].shape == (8, 2)
    leaves = jax.tree.leaves(params)  # kernels and biases alike: U(-0.1, 0.1)
    assert len(leaves) == 6 and all(0.05 < np.abs(p).max() <= 0.1 for p in leaves)
    shapes = jax.eval_shape(get_model('mlp', 3).init, jax.random.key(0), jnp.zeros((4, 5, 6, 2)))
    assert shapes['params']['hidden_0']['kernel'].value.shape == (60, 8)


# A conv kernel and a batch norm of each model family, by parameter path.
CONV_AND_BN = {
    CNN: ('conv_1_1', 'bn_1_1'),
    WideResNet: ('block_1/conv_1', 'head_bn'),
    ResNet50: ('block_1/conv_2', 'stem_bn'),
    ResNet: ('block_1/conv_2', 'stem_bn'),
}


@pytest.mark.parametrize('name', sorted(set(MODELS) - TESTED_ELSEWHERE))
def test_logical_partitioning_and_float32_params(name):
    model = get_model(name, 10, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), _images())
    boxed = jax.tree.leaves(shapes['params'], is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)  # every param annotated
    assert all(v.value.dtype == jnp.float32 for v in boxed)
    specs = nn.get_partition_spec(shapes)['params']
    assert specs['classifier'] == {'kernel': P('features_in', 'classes'), 'bias': P('classes')}
    if name == 'mlp':
        assert specs['hidden_0'] == {'kernel': P('features_in', 'features'),
                                     'bias': P('features')}
        return
    conv_path, bn_path = CONV_AND_BN[type(model)]
    conv_spec = functools.reduce(lambda d, k: d[k], conv_path.split('/'), specs)
    assert conv_spec == {'kernel': P(None, None, 'conv_in', 'channels')}
    assert specs[bn_path] == {'scale': P('channels'), 'bias': P('channels')}


def test_sharded_apply_matches_unsharded():
    """Activation constraints under a ('data', 'model') mesh with rules change nothing numerically."""
    model = WideResNet(10, depth=10, width=1)
    x = _images(n=8, size=8)
    variables = _jit(model.init)(jax.random.key(0), x)
    expected, _ = _jit(lambda v, x: _train_apply(model, v, x))(variables, x)
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    rules = [('batch', 'data'), ('width', 'model'), ('channels', None), ('features', None)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # A fresh function: jax's trace cache does not see the logical axis rules.
        step = _jit(lambda v, x: _train_apply(model, v, x))
        got, _ = step(variables, x)
        hlo = step.lower(variables, x).as_text()
    assert hlo.count('sharding_constraint') >= 6  # input, stem, 3 blocks, pooled features
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_is_decayed_skips_normalisation_layers_only():
    variables = jax.eval_shape(get_model('wrn28_2', 10).init, jax.random.key(0), _images())
    mask = decay_mask(nn.unbox(variables['params']))
    paths = jax.tree_util.tree_flatten_with_path(mask)[0]
    decayed = {'/'.join(str(k.key) for k in path) for path, v in paths if v}
    skipped = {'/'.join(str(k.key) for k in path) for path, v in paths if not v}
    assert {'stem/kernel', 'classifier/kernel', 'classifier/bias',
            'block_5/shortcut_conv/kernel'} <= decayed
    assert {'head_bn/scale', 'head_bn/bias', 'block_1/bn_1/scale'} <= skipped
    assert all('bn' in p.split('/')[-2] for p in skipped)
    # String paths (flax.traverse_util), boxed trees and shapeless calls follow the same rule.
    assert is_decayed(('hidden_0', 'kernel'), jnp.zeros((2, 3)))
    assert is_decayed(('hidden_0', 'bias'), jnp.zeros((3,)))
    assert not is_decayed(('bn', 'scale'))
    assert not is_decayed(('LayerNorm_0', 'bias'))
    boxed_mask = decay_mask(variables['params'])
    assert jax.tree.leaves(boxed_mask) == jax.tree.leaves(mask)


@pytest.mark.parametrize('name,options', [
    ('wrn', dict(depth=10, width=1, stochastic_depth_rate=0.2)),
    ('efficientnet', dict(width_coefficient=0.1, depth_coefficient=0.1, small_images=True)),
])
def test_remat_changes_memory_not_gradients(name, options):
  """`remat=True` recomputes each block in the backward pass: same parameters, same gradients
  (stochastic depth included: the recomputation replays the same random mask)."""
  x = _images(n=4, size=16)
  labels = jnp.arange(4)
  grads, programs = [], []
  for remat in (False, True):
    model = get_model(name, 10, remat=remat, **options)
    variables = nn.unbox(model.init(jax.random.key(1), x))

    def loss(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(2)})
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    grad_fn = _jit(jax.grad(loss))
    grads.append(grad_fn(variables['params']))
    programs.append(grad_fn.lower(variables['params']).as_text())
  assert jax.tree.structure(grads[0]) == jax.tree.structure(grads[1])
  # 1e-5 relative: under the tests' --xla_cpu_use_fusion_emitters=false (conftest.py) the two
  # programs sum EfficientNet's gradients in different orders (bit-equal with XLA's default
  # emitters); a replayed mask that differed would change gradients by far more.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)
  # The recomputation is really there: jax.checkpoint lowers to optimisation barriers.
  assert programs[1].count('optimization_barrier') > programs[0].count('optimization_barrier')


def test_from_config_builds_the_module_get_model_builds():
  """A `model` block read back from config.json (lists, a dtype string) builds the very module
  `get_model` builds from the config's tuples and dtype: equal, with equal hashes (a list field
  would make the module unhashable, a dtype left a string would hash differently), so a resumed
  or restored run compares and caches its networks as the original run did."""
  block = {'name': 'mlp', 'hidden_sizes': [16, 4], 'activation': 'relu', 'dtype': 'bfloat16'}
  model = from_config(block, 3)
  want = get_model('mlp', 3, hidden_sizes=(16, 4), activation='relu',
                   dtype=jnp.dtype('bfloat16'))
  assert model == want and hash(model) == hash(want)
  assert from_config({'name': 'cnn', 'features': [4, 8], 'dtype': None}, 10) == CNN(
      10, features=(4, 8))


ACTIVATION_FORMULAS = {'sigmoid': lambda z: 1 / (1 + np.exp(-z)),
                       'relu': lambda z: np.maximum(z, 0), 'tanh': np.tanh}


@pytest.mark.parametrize('activation', sorted(ACTIVATION_FORMULAS))
def test_mlp_applies_its_activation_after_every_hidden_layer(activation):
  """The MLP is dense -> activation for every hidden size, then a linear classifier (the paper's
  TwoMoons nets: sigmoid units in both hidden layers). Its logits equal that network written
  out in numpy, on (N, 2, 3) inputs flattened to 6 features, with three hidden layers."""
  model = MLP(3, hidden_sizes=(5, 4, 6), activation=activation, initializer='uniform',
              init_scale=1.0)
  x = np.random.default_rng(0).normal(size=(7, 2, 3)).astype(np.float32)
  params = nn.unbox(model.init(jax.random.key(0), x)['params'])
  h = x.reshape(7, 6).astype(np.float64)
  for i in range(3):
    layer = params[f'hidden_{i}']
    h = ACTIVATION_FORMULAS[activation](
        h @ np.asarray(layer['kernel']) + np.asarray(layer['bias']))
  want = h @ np.asarray(params['classifier']['kernel']) + np.asarray(params['classifier']['bias'])
  np.testing.assert_allclose(model.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scale', [0.1, 0.5])
def test_mlp_uniform_init_fills_the_symmetric_range(scale):
  """initializer='uniform' draws every kernel and bias from U(-init_scale, init_scale) (the
  paper's TwoMoons nets: U(-0.1, 0.1)): values of both signs reaching to near either bound,
  none beyond, mean near 0; `init_scale` sets the bound."""
  model = MLP(2, hidden_sizes=(64, 64), initializer='uniform', init_scale=scale)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2)))['params'])
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    w = np.asarray(leaf).ravel()
    assert np.abs(w).max() <= scale, path
    if w.size >= 64:  # kernels, hidden biases
      assert w.min() < -0.8 * scale and w.max() > 0.8 * scale, path
      assert abs(w.mean()) < 0.25 * scale, path


def test_cnn_stage_resolutions_relus_and_dropout_on_pooled_features(monkeypatch):
  """Each CNN stage is (3x3 conv -> BN -> ReLU) x 2 then a 2x2 max-pool: on 32x32 images the
  stages' convs run at 32, 16 and 8 pixels, there is one ReLU per conv, and dropout acts on the
  globally pooled (N, C) features, as the module docstring says."""
  model = CNN(10, features=(4, 4, 8), dropout_rate=0.5)
  x = _images()
  convs, dropout_inputs, relus = {}, [], []
  relu = nn.relu

  def recording_relu(y):
    relus.append(y.shape)
    return relu(y)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, nn.Conv):
      convs[context.module.name] = out.shape[1:]
    if context.method_name == '__call__' and isinstance(context.module, nn.Dropout):
      dropout_inputs.append(args[0].ndim)
    return out

  monkeypatch.setattr(nn, 'relu', recording_relu)
  traced_training_pass(model, x, interceptor)
  assert convs == {'conv_1_1': (32, 32, 4), 'conv_1_2': (32, 32, 4), 'conv_2_1': (16, 16, 4),
                   'conv_2_2': (16, 16, 4), 'conv_3_1': (8, 8, 8), 'conv_3_2': (8, 8, 8)}
  per_pass = [(2, 32, 32, 4)] * 2 + [(2, 16, 16, 4)] * 2 + [(2, 8, 8, 8)] * 2
  assert relus == per_pass * 2   # the traced init, then the training pass
  assert dropout_inputs == [2]


def test_resnet_v15_strides_and_relu_after_the_residual_add():
  """ResNet v1.5 on 32x32 images: the 7x7/2 stem conv (16 px) and the 3x3/2 max-pool bring
  8x8 maps to the first stage, which keeps them; a later stage's first block halves them in its
  3x3 conv (its 1x1 conv still runs at the input's 8 px: v1, with the stride in the 1x1 conv,
  would not) and in its projection shortcut. Every block ends with a ReLU after the residual
  add, so block outputs are non-negative (projection shortcuts alone are not)."""
  model = ResNet(10, stage_sizes=(2, 1), num_filters=8)
  x = _images()
  variables = model.init(jax.random.key(0), x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  inter = state['intermediates']
  out = lambda *path: functools.reduce(lambda d, k: d[k], path, inter)['__call__'][0]
  assert out('stem_conv').shape[1:3] == (16, 16)
  assert out('block_1').shape[1:] == out('block_2').shape[1:] == (8, 8, 32)
  assert out('block_3', 'conv_1').shape[1:] == (8, 8, 16)
  assert out('block_3', 'conv_2').shape[1:] == (4, 4, 16)
  assert out('block_3', 'shortcut_conv').shape[1:] == (4, 4, 64)
  assert out('block_3').shape[1:] == (4, 4, 64)
  assert np.asarray(out('block_1', 'shortcut_bn')).min() < 0
  for name in ('block_1', 'block_2', 'block_3'):
    assert np.asarray(out(name)).min() >= 0 and np.asarray(out(name)).max() > 0, name


def _drop_connect_rates(model, x):
  """{block name: rate} of every StochasticDepth layer in a training pass, traced only."""
  rates = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, StochasticDepth):
      block = next(p for p in context.module.scope.path if p.startswith('block'))
      rates[block] = context.module.rate
    return next_fun(*args, **kwargs)

  traced_training_pass(model, x, interceptor)
  return rates


def test_resnet_stochastic_depth_grows_with_the_block_index():
  """Stochastic depth in a ResNet follows the linear schedule rate * i / num_blocks over all
  blocks (0-based i; wide_resnet.stochastic_depth_rates), on identity-shortcut blocks only:
  stages (3, 2) of 5 blocks at rate 0.5 drop block_2, block_3 and block_5 (projection blocks
  1 and 4 never) with 0.1, 0.2 and 0.4."""
  model = ResNet(10, stage_sizes=(3, 2), num_filters=4, stochastic_depth_rate=0.5)
  rates = _drop_connect_rates(model, _images(size=16))
  assert rates == pytest.approx({'block_2': 0.1, 'block_3': 0.2, 'block_5': 0.4})
