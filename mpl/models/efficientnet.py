"""EfficientNet B0-B7, L2 and B6-Wide, as in Noisy Student and Meta Pseudo Labels.

Follows `EfficientNet` in google-research/google-research `meta_pseudo_labels/modeling.py` (and
`mb_conv_block`, `squeeze_and_excitation`, `dw_conv2d` in `modeling_utils.py`), which builds
the same network as tensorflow/tpu `models/official/efficientnet/efficientnet_builder.py` and
`efficientnet_model.py` (written anew here, not copied):

- Stem: 3x3 conv, stride 2, `round_filters(32)` channels -> BN -> swish.
- Seven stages of MBConv blocks, `BLOCKS` below: (repeats, kernel, stride, expand ratio, output
  filters) = (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
  (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320); filters go through `round_filters`
  and repeats through `round_repeats`; only a stage's first block has its stride.
- MBConv block: [1x1 expand conv (in * expand) -> BN -> swish, skipped when expand is 1] ->
  kxk depthwise conv (stride) -> BN -> swish -> squeeze-excitation -> 1x1 project conv -> BN
  (no activation). When the stride is 1 and the width is unchanged, the branch goes through
  drop-connect (per-example stochastic depth) and is added to the input; otherwise there is no
  shortcut at all.
- Squeeze-excitation: global average pool -> 1x1 conv with bias to
  max(1, int(block_input_filters * 0.25)) channels (the block's *input*, not its expanded width)
  -> swish -> 1x1 conv with bias back to the expanded width -> sigmoid -> multiply.
- Head: 1x1 conv to `round_filters(1280)` -> BN -> swish -> global average pool -> dropout ->
  dense -> cast to float32.
- `round_filters(f, w)`: f * w rounded to the nearest multiple of 8 (at least 8), plus 8 more
  if that lost over 10 %. `round_repeats(r, d)`: ceil(r * d).
- Convs have no bias (except squeeze-excitation's); TF 'SAME' padding (flax's 'SAME' pads the
  same way, the extra pixel at the bottom / right); swish = x * sigmoid(x).
- Conv init: N(0, 2 / (kh * kw * out)) with TF's kernel layout, i.e. He-normal fan-out for
  regular convs (`conv_kernel_init`). TF's depthwise kernel is (k, k, C, 1), so its "fan-out"
  is k * k; flax stores it as (k, k, 1, C), whose fan-*in* is k * k: `depthwise_kernel_init`.
  Squeeze-excitation convs use the regular conv init and zero biases.
- Dense init: U(-1/sqrt(num_classes), 1/sqrt(num_classes)), zero bias (`official_dense_init`).
- Batch norm: momentum 0.99, epsilon 1e-3 (TF's `batch_norm_decay` / `batch_norm_epsilon`).
- Drop-connect: rate * block_index / num_blocks over all blocks (0-based; the first block is
  never dropped), as both references; 0.2 in both (`drop_connect_rate`, the MPL flag
  `stochastic_depth_drop_rate`).

`VARIANTS` holds (width, depth, resolution, dropout) per variant. B0-B7 and L2 are
tensorflow/tpu's `efficientnet_params` (L2 = (4.3, 5.3, 800, 0.5); the MPL code's table says 600
for L2's evaluation size, and the MPL paper's L2 run used 512x512 images). B6-Wide is the MPL code's
'efficientnet-b6-mpl' (5.0, 2.6, 800, 0.5): B6's depth with width 5.0. The resolution is only the
customary image size; the network itself accepts any size.

Sharding names, as the other models: conv kernels (None, None, 'conv_in', 'channels'), depthwise
kernels (None, None, None, 'channels') (flax's (k, k, 1, C) layout), squeeze-excitation and
batch-norm vectors ('channels',), classifier ('features_in', 'classes'); activations are
constrained (`mpl.sharding.constrain`) to ('batch', 'height', 'width', 'channels') after the stem
and after each block and to ('batch', 'features') after pooling. Batch norms are named '*_bn'
(no weight decay, see models/__init__.py).

`scan_blocks=True` (set by the L2 config) runs each stage's repeated blocks, all but its first
(which changes the stride or width), as one `nn.scan` step each over stacked weights: the program
holds one block body per stage instead of every block (L2: 14 instead of 88), and the TPU
compiler needs less host memory for it (measured in README, Scaling up; not less time). Their
variables are named 'blocks_<first>_to_<last>' (1-based block indices, as 'block_<i>') with a
leading axis of one entry per block, unsplit by the mesh; each block keeps its own drop-connect
rate and rng. Outputs, batch-norm updates and gradients equal the unrolled
network's (tests/test_efficientnet.py); `stack_block_variables` converts unrolled variables.

`small_images=True` is the MPL code's variant for CIFAR / SVHN (`_is_small_net`): stride 1 in
the stem and in stages 2 and 3 (stages 4 and 6 keep stride 2), so 32x32 inputs end at 8x8.

Parameter counts with 1000 classes (checked in tests/test_efficientnet.py), equal to the
published ones: B0 5,288,548, B1 7,794,184, B2 9,109,994, B3 12,233,232, B4 19,341,616,
B5 30,389,784, B6 43,040,704, B7 66,347,960, L2 480,309,308 (timm's 480.31M); B6-Wide
316,649,180 (no published figure found).
"""
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpl.models.wide_resnet import (DENSE_AXES, IMAGE_AXES, StochasticDepth, batch_norm,
                                    classifier, conv, conv_kernel_init, official_dense_init,
                                    stochastic_depth_rates)
from mpl import sharding
from mpl.sharding import constrain

# TF's depthwise kernel (k, k, C, 1) has fan-out k * k; flax's (k, k, 1, C) has fan-in k * k.
depthwise_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    filters: int


# The seven stages of EfficientNet-B0, before width / depth scaling.
BLOCKS = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)
STEM_FILTERS, HEAD_FILTERS = 32, 1280
SE_RATIO = 0.25
DIVISOR = 8


class Variant(NamedTuple):
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, Variant] = {
    'b0': Variant(1.0, 1.0, 224, 0.2),
    'b1': Variant(1.0, 1.1, 240, 0.2),
    'b2': Variant(1.1, 1.2, 260, 0.3),
    'b3': Variant(1.2, 1.4, 300, 0.3),
    'b4': Variant(1.4, 1.8, 380, 0.4),
    'b5': Variant(1.6, 2.2, 456, 0.4),
    'b6': Variant(1.8, 2.6, 528, 0.5),
    'b7': Variant(2.0, 3.1, 600, 0.5),
    'l2': Variant(4.3, 5.3, 800, 0.5),
    'b6_wide': Variant(5.0, 2.6, 800, 0.5),  # MPL's 'efficientnet-b6-mpl'
}


def round_filters(filters: int, width_coefficient: float, divisor: int = DIVISOR) -> int:
    """filters * width, to the nearest multiple of `divisor` (>= divisor), never 10 % below."""
    scaled = filters * width_coefficient
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    """Blocks in a stage: ceil(repeats * depth)."""
    return int(math.ceil(repeats * depth_coefficient))


class DepthwiseConv(nn.Module):
    """kxk depthwise conv, 'SAME' padding, no bias: flax's nn.Conv with feature_group_count =
    channels (same parameter name, shape and init), computed by `depthwise_conv2d`."""
    kernel_size: int
    strides: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', nn.with_logical_partitioning(
            depthwise_kernel_init, (None, None, None, 'channels')), (k, k, 1, x.shape[-1]),
            jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return depthwise_conv2d(x, kernel, self.strides)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax_depthwise(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), 'SAME',
                                        dimension_numbers=_NHWC,
                                        feature_group_count=x.shape[-1])


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
    """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel, 'SAME' padding.

    XLA's SPMD partitioner (jax 0.10 to 0.12, both Shardy and GSPMD) gets this conv's kernel
    gradient wrong when some mesh axis holds copies of the images while another splits them
    (the images split over 'data', replicated over 'model'; or in strips over 'model',
    replicated over 'data'): JAX writes the gradient as a convolution with batch_group_count =
    C, and the partitioned program also sums it over the replicating axis (it comes out that
    axis's size times too large). Split over every mesh axis (width strips over 'model' and
    images over 'data', or whole images over both), it is right: measured with jax 0.10 on
    CPU, tests/test_efficientnet.py.

    So on a mesh with a 'model' axis larger than 1, `x` is constrained to the activation layout
    (`sharding.activation_spec`), and where that layout copies the images over an axis, the
    kernel gradient is computed by `_depthwise_with_tap_gradient` instead. The taps cost memory:
    under width strips the partitioner materialises each tap's shifted window of the padded
    input (on EfficientNet-L2, 1 GB per window in the 256 x 256 stage), so they are kept to
    where they are needed.
    """
    mesh = jax.sharding.get_abstract_mesh()
    # Also with one data replica (where the plain conv would be right), so that `mpl.bench
    # --dry_run --mesh 16` compiles the program a 128 x 16 run executes.
    model_parallel = not mesh.empty and mesh.shape.get('model', 1) > 1
    if not model_parallel:
        return _lax_depthwise(x, kernel, strides)
    layout = sharding.activation_spec(x.shape, IMAGE_AXES)
    if layout is not None and sharding.splits_over_every_axis(layout):
        return _lax_depthwise(jax.lax.with_sharding_constraint(x, layout), kernel, strides)
    # The backward below is traced outside any `jax.default_matmul_precision` block the forward
    # is in (MPL's h passes ask for 'highest'): it is carried along.
    precision = jax.config.jax_default_matmul_precision
    return _depthwise_with_tap_gradient(x, kernel, strides, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_with_tap_gradient(x, kernel, strides, precision=None):
    with jax.default_matmul_precision(precision):
        return _lax_depthwise(x, kernel, strides)


def _tap_forward(x, kernel, strides, precision):
    with jax.default_matmul_precision(precision):
        return _lax_depthwise(x, kernel, strides), (x, kernel)


def _tap_backward(strides, precision, residuals, dy):
    """Input gradient: the conv's own transpose (partitioned correctly). Kernel gradient, one
    tap (i, j) at a time: dK[i, j, 0, c] = sum over n, h, w of
    x_padded[n, i + strides * h, j + strides * w, c] * dy[n, h, w, c], products and sums that
    the partitioner handles like any other reduction."""
    x, kernel = residuals
    with jax.default_matmul_precision(precision):
        _, input_vjp = jax.vjp(lambda x: _lax_depthwise(x, kernel, strides), x)
        (dx,) = input_vjp(dy)
    k = kernel.shape[0]
    (pad_h, pad_w) = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (strides, strides), 'SAME')
    x_padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    n, out_h, out_w, channels = dy.shape
    taps = []
    for i in range(k):
        for j in range(k):
            window = jax.lax.slice(
                x_padded, (0, i, j, 0),
                (n, i + strides * (out_h - 1) + 1, j + strides * (out_w - 1) + 1, channels),
                (1, strides, strides, 1))
            # Products in float32, as the conv it replaces accumulates them (bf16 inputs).
            taps.append(jnp.sum(window.astype(jnp.float32) * dy.astype(jnp.float32),
                                axis=(0, 1, 2)))
    dkernel = jnp.stack(taps).reshape(k, k, 1, channels).astype(kernel.dtype)
    return dx, dkernel


_depthwise_with_tap_gradient.defvjp(_tap_forward, _tap_backward)


def biased_conv1x1(features: int, *, dtype: Any, name: str) -> nn.Conv:
    """1x1 conv with bias (squeeze-excitation), He fan-out init, zero bias; kernel
    (None, None, 'conv_in', 'channels'), bias ('channels',)."""
    return nn.Conv(
        features, (1, 1), use_bias=True, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            conv_kernel_init, (None, None, 'conv_in', 'channels')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('channels',)),
        name=name)


class SqueezeExcite(nn.Module):
    """Channel gating: sigmoid(expand(swish(reduce(mean over H, W)))) * x."""
    reduced_features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.swish(biased_conv1x1(self.reduced_features, dtype=self.dtype, name='reduce')(s))
        s = biased_conv1x1(x.shape[-1], dtype=self.dtype, name='expand')(s)
        return x * nn.sigmoid(s)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (see the module docstring)."""
    features: int
    kernel: int
    strides: int
    expand_ratio: int
    stochastic_depth_rate: float
    dtype: Any
    bn_momentum: float
    bn_epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, stochastic_depth_rate=None) -> jax.Array:
        """`stochastic_depth_rate` (traced) replaces the field's: see `EfficientNet.scan_blocks`."""
        bn = lambda name: batch_norm(train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                     dtype=self.dtype, name=name)
        in_features = x.shape[-1]
        expanded = in_features * self.expand_ratio

        y = x
        if self.expand_ratio != 1:
            y = conv(expanded, 1, dtype=self.dtype, name='expand_conv')(y)
            y = nn.swish(bn('expand_bn')(y))
        y = DepthwiseConv(self.kernel, self.strides, dtype=self.dtype,
                          name='depthwise_conv')(y)
        y = nn.swish(bn('depthwise_bn')(y))
        y = SqueezeExcite(max(1, int(in_features * SE_RATIO)), dtype=self.dtype, name='se')(y)
        y = conv(self.features, 1, dtype=self.dtype, name='project_conv')(y)
        y = bn('project_bn')(y)

        if self.strides == 1 and in_features == self.features:
            y = StochasticDepth(self.stochastic_depth_rate)(y, deterministic=not train,
                                                            rate=stochastic_depth_rate)
            return x + y
        return y


class EfficientNet(nn.Module):
    """EfficientNet with the given width / depth coefficients; float32 logits (N, classes).

    Defaults are B0's with the official regularisation (dropout 0.2 before the classifier,
    drop-connect 0.2); the registry's presets set each variant's coefficients and its official
    dropout (see `VARIANTS`).
    """
    num_classes: int
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    dropout_rate: float = 0.2
    stochastic_depth_rate: float = 0.2
    small_images: bool = False
    dtype: Any = jnp.float32
    remat: bool = False      # recompute each block's activations in the backward pass
    # Each stage's repeated blocks (all but its first, which changes the stride or width) as one
    # `nn.scan` over their stacked weights: the compiled program holds one block per stage
    # instead of every block (L2: 14 block bodies instead of 88), compiled with less host
    # memory, with the same outputs and gradients (tests). The weights are then stored as
    # 'blocks_<first>_to_<last>' with a leading axis of one entry per block
    # (`stack_block_variables` converts unrolled variables).
    scan_blocks: bool = False
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3

    # Under spatial partitioning each block gathers its own weights when it runs (and again when
    # remat recomputes it), so only about one block's gathered weights are alive at a time; the
    # methods pass the variables as stored (mpl.methods.base.for_compute).
    gathers_own_weights = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        gathered = lambda layer_class: sharding.gathered_when_called(
            layer_class, self.dtype, self.is_initializing())
        bn = lambda name: batch_norm(train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                     dtype=self.dtype, name=name,
                                     layer_class=gathered(nn.BatchNorm))
        filters = lambda f: round_filters(f, self.width_coefficient)
        repeats = [round_repeats(s.repeats, self.depth_coefficient) for s in BLOCKS]
        drop_rates = stochastic_depth_rates(self.stochastic_depth_rate, sum(repeats))
        # The MPL code's CIFAR variant keeps the resolution in the stem and stages 2 and 3.
        stem_stride, stage_strides = 2, [s.stride for s in BLOCKS]
        if self.small_images:
            stem_stride, stage_strides[1], stage_strides[2] = 1, 1, 1

        x = constrain(jnp.asarray(x, self.dtype), IMAGE_AXES)
        x = conv(filters(STEM_FILTERS), 3, stem_stride, dtype=self.dtype, name='stem_conv',
                 layer_class=gathered(nn.Conv))(x)
        x = nn.swish(bn('stem_bn')(x))
        x = constrain(x, IMAGE_AXES)

        # remat: keep only block inputs for the backward pass (memory for compute).
        block_class = gathered(MBConvBlock)
        if self.remat:
            block_class = nn.remat(block_class, static_argnums=(2,))
        index = 0
        for stage, stride, num_blocks in zip(BLOCKS, stage_strides, repeats):
            block = functools.partial(
                block_class, features=filters(stage.filters), kernel=stage.kernel,
                expand_ratio=stage.expand_ratio, dtype=self.dtype,
                bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
            scanned = num_blocks - 1 if self.scan_blocks else 0
            for b in range(num_blocks - scanned):
                x = block(strides=stride if b == 0 else 1,
                          stochastic_depth_rate=drop_rates[index],
                          name=f'block_{index + 1}')(x, train)
                x = constrain(x, IMAGE_AXES)
                index += 1
            if scanned:
                rates = drop_rates[index:index + scanned]
                x = self._scan_repeated_blocks(
                    block(strides=1, stochastic_depth_rate=max(rates),
                          name=f'blocks_{index + 1}_to_{index + scanned}'),
                    x, train, rates)
                index += scanned

        x = conv(filters(HEAD_FILTERS), 1, dtype=self.dtype, name='head_conv',
                 layer_class=gathered(nn.Conv))(x)
        x = nn.swish(bn('head_bn')(x))
        x = jnp.mean(x, axis=(1, 2))
        x = constrain(x, DENSE_AXES)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = classifier(self.num_classes, dtype=self.dtype, kernel_init=official_dense_init,
                       layer_class=gathered(nn.Dense))(x)
        return x.astype(jnp.float32)

    @staticmethod
    def _scan_repeated_blocks(block: nn.Module, x: jax.Array, train: bool,
                              rates: list[float]) -> jax.Array:
        """x through len(rates) copies of `block` (stride 1, same width), one `nn.scan` step
        each, block i with drop-connect rate rates[i]: weights and batch statistics stacked on
        a leading, unsplit axis; its own 'params' / 'dropout' rng per block."""
        def step(block, x, rate):
            # `block`'s stochastic_depth_rate field only says whether it is 0 (then no rng).
            y = block(x, train, rate if max(rates) > 0 else None)
            return constrain(y, IMAGE_AXES), None
        scan = nn.scan(step, variable_axes={'params': 0, 'batch_stats': 0},
                       split_rngs={'params': True, 'dropout': True}, length=len(rates),
                       metadata_params={nn.PARTITION_NAME: None})
        x, _ = scan(block, x, jnp.asarray(rates, jnp.float32))
        return x


def stack_block_variables(unrolled: dict, scanned_template: dict) -> dict:
    """Variables of an unrolled EfficientNet ('block_1' ... 'block_n'), arranged as those of the
    same network with `scan_blocks=True` (`scanned_template`: its variables or their shapes):
    each 'blocks_<a>_to_<b>' entry is blocks a..b stacked on a new leading axis. Works on any
    collection ('params', 'batch_stats') and on optimizer-state-like trees of the same shape."""
    out = {}
    for name, template in scanned_template.items():
        if name.startswith('blocks_'):
            first, last = (int(n) for n in name[len('blocks_'):].split('_to_'))
            blocks = [unrolled[f'block_{i}'] for i in range(first, last + 1)]
            out[name] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
        else:
            out[name] = unrolled[name]
    return out
