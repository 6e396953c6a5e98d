"""WideResNet-28-k as in the official Meta Pseudo Labels code.

Follows `Wrn28k` in google-research/google-research `meta_pseudo_labels/modeling.py` and the ops
it calls in `meta_pseudo_labels/modeling_utils.py` (written anew here, not copied):

- Stem: one 3x3 conv, stride 1, with 16k channels (`s = [16*k, 16*k, 32*k, 64*k]`,
  `ops.conv2d(x, 3, s[0], 1)`), no batch norm and no activation after it. (The WRN paper's stem
  has 16 channels: WRN-28-2 at 10 classes has 1,467,610 parameters with it, 1,472,170 with
  this one; both are the "1.47M" papers quote.) The official code special-cases k = 135 with a
  16-channel stem (`s = [16, 135, 270, 540]`); that width is not reproduced here.
- Three stages of (depth - 4) / 6 = 4 blocks (`block_1` ... `block_12`), widths 16k, 32k, 64k,
  strides 1, 2, 2 on each stage's first block.
- Block (`wrn_block`): pre-activation. `BN -> leaky ReLU -> conv3x3(stride) -> BN -> leaky ReLU
  -> conv3x3`. No dropout inside the block.
- Shortcut (`wrn_block`, scope 'residual'): identity when stride 1 and the width is unchanged,
  otherwise leaky ReLU of the *first BN's output* followed by a 1x1 conv with the block's stride,
  i.e. the projection always sees the activated input ("activate before residual" on every
  projection block). There is no separate `activate_before_residual` flag: since the stem already
  has 16k channels, `block_1` is an identity block whose shortcut is the raw stem output.
- Convs have no bias; SAME padding; kernel init N(0, 2 / (kh * kw * out)), i.e. He-normal
  fan-out (`_conv_kernel_initializer`).
- Batch norm (`sync_batch_norm`): decay 0.99, epsilon 1e-3 (flags `batch_norm_decay`,
  `batch_norm_epsilon` in `flag_utils.py`), gamma 1, beta 0. Statistics here cover the global
  batch; the official `sync_batch_norm` averages them over all replicas only up to 8 of them,
  beyond that over groups of replicas (`batch_norm_batch_size`, else max(8, replicas // 8)).
  The CIFAR runs (one replica group) are the same; ImageNet / L2 runs on many replicas differ.
- Leaky ReLU slope 0.2 everywhere (`ops.relu` defaults to `leaky=0.2`).
- Head: BN -> leaky ReLU -> global average pool -> dropout (`dense_dropout_rate`) -> dense ->
  cast to float32.
- Dense init (`_dense_kernel_initializer`): U(-r, r) with r = 1 / sqrt(shape[-1]), and
  shape[-1] is the number of *outputs* (classes), not the fan-in; bias 0. Reproduced here as
  `variance_scaling(1/3, 'fan_out', 'uniform')`, which has exactly that range.

Additions that the official WRN does not have (off by default): per-example stochastic depth
with the EfficientNet schedule of the same file (`mb_conv_block`: rate * block_index /
num_blocks, applied only to blocks with an identity shortcut), and a compute `dtype`.

This file also holds the pieces shared with `resnet.py`: the partitioned initialisers, the
conv / batch-norm / classifier constructors and `StochasticDepth`.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpl.sharding import constrain

# Logical axis names of activations (see STYLE.md: mapped to mesh axes by rules in the config).
IMAGE_AXES = ('batch', 'height', 'width', 'channels')
DENSE_AXES = ('batch', 'features')

# He-normal fan-out: N(0, 2 / (kh * kw * out_channels)); flax's fan_out for a conv kernel
# (kh, kw, in, out) is kh * kw * out. 'normal' here is the untruncated normal, as in TF.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# U(-1/sqrt(num_outputs), 1/sqrt(num_outputs)): the official MPL dense initialiser.
official_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


def conv(features: int, kernel: int, strides: int = 1, *, dtype: Any, name: str,
         padding: Any = 'SAME', kernel_init: Callable = conv_kernel_init,
         layer_class: Callable = nn.Conv) -> nn.Conv:
    """Bias-free square conv with logically partitioned kernel (h, w, conv_in, channels).
    `layer_class`: nn.Conv, or nn.Conv wrapped (sharding.gathered_when_called)."""
    return layer_class(
        features, (kernel, kernel), strides=(strides, strides), padding=padding,
        use_bias=False, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            kernel_init, (None, None, 'conv_in', 'channels')),
        name=name)


def batch_norm(train: bool, *, momentum: float, epsilon: float, dtype: Any, name: str,
               zero_scale: bool = False, layer_class: Callable = nn.BatchNorm) -> nn.BatchNorm:
    """Batch norm over all non-channel axes of the (global) batch; no axis_name on purpose.

    Under `jax.jit` the batch is one global array, so the statistics already cover every device.
    `layer_class`: nn.BatchNorm, or nn.BatchNorm wrapped (sharding.gathered_when_called).
    """
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return layer_class(
        use_running_average=not train, momentum=momentum, epsilon=epsilon,
        dtype=dtype, param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(scale_init, ('channels',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('channels',)),
        name=name)


def classifier(num_classes: int, *, dtype: Any, kernel_init: Callable,
               bias_init: Callable = nn.initializers.zeros,
               layer_class: Callable = nn.Dense) -> nn.Dense:
    """Final dense layer 'classifier': kernel ('features_in', 'classes'), bias ('classes',).
    `layer_class`: nn.Dense, or nn.Dense wrapped (sharding.gathered_when_called)."""
    return layer_class(
        num_classes, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, ('features_in', 'classes')),
        bias_init=nn.with_logical_partitioning(bias_init, ('classes',)),
        name='classifier')


def stochastic_depth_rates(rate: float, num_blocks: int) -> list[float]:
    """Per-block drop rates, linear in depth: rate * i / num_blocks for block i = 0..n-1.

    The schedule of EfficientNet / Noisy Student as written in the official MPL code
    (`stochastic_depth_drop_rate * float(block_start + i) / num_blocks`): the first block is
    never dropped and the last one is dropped with rate * (n - 1) / n.
    """
    return [rate * i / num_blocks for i in range(num_blocks)]


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per example with probability `rate` (train only).

    Kept branches are scaled by 1 / (1 - rate), so the expectation is unchanged and evaluation
    needs no rescaling. Uses the 'dropout' rng; with rate 0 or at eval it needs no rng.
    """
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, rate=None) -> jax.Array:
        """`rate` (a traced scalar) replaces the module's rate: a block scanned over a stage
        (EfficientNet's `scan_blocks`) gets its own rate as a scanned input."""
        if deterministic or (rate is None and self.rate == 0.0):
            return x
        keep = 1.0 - (self.rate if rate is None else rate)
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, mask_shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class WideResNetBlock(nn.Module):
    """Pre-activation block of the official `wrn_block` (see the module docstring)."""
    features: int
    strides: int
    stochastic_depth_rate: float
    dtype: Any
    bn_momentum: float
    bn_epsilon: float
    leaky_relu_slope: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: batch_norm(train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                     dtype=self.dtype, name=name)
        act = lambda y: nn.leaky_relu(y, negative_slope=self.leaky_relu_slope)
        projection = self.strides != 1 or x.shape[-1] != self.features

        y = act(bn('bn_1')(x))
        shortcut = x
        if projection:  # official: residual = relu(bn_1(x)); conv 1x1 with the block's stride
            shortcut = conv(self.features, 1, self.strides, dtype=self.dtype,
                            name='shortcut_conv')(y)
        y = conv(self.features, 3, self.strides, dtype=self.dtype, name='conv_1')(y)
        y = act(bn('bn_2')(y))
        y = conv(self.features, 3, 1, dtype=self.dtype, name='conv_2')(y)
        if not projection:  # as EfficientNet: only branches with an identity shortcut are dropped
            y = StochasticDepth(self.stochastic_depth_rate)(y, deterministic=not train)
        return shortcut + y


class WideResNet(nn.Module):
    """WideResNet-depth-width of the official MPL code; returns float32 logits (N, classes)."""
    num_classes: int
    depth: int = 28
    width: int = 2
    dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False      # recompute each block's activations in the backward pass
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    leaky_relu_slope: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f'WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}.')
        blocks_per_stage = (self.depth - 4) // 6
        k = self.width
        widths, strides = (16 * k, 32 * k, 64 * k), (1, 2, 2)
        drop_rates = stochastic_depth_rates(self.stochastic_depth_rate, 3 * blocks_per_stage)

        x = constrain(jnp.asarray(x, self.dtype), IMAGE_AXES)
        x = conv(16 * k, 3, 1, dtype=self.dtype, name='stem')(x)
        x = constrain(x, IMAGE_AXES)
        # remat: keep only block inputs for the backward pass (memory for compute).
        block_class = nn.remat(WideResNetBlock, static_argnums=(2,)) if self.remat else WideResNetBlock
        index = 0
        for stage_width, stage_stride in zip(widths, strides):
            for b in range(blocks_per_stage):
                x = block_class(
                    features=stage_width, strides=stage_stride if b == 0 else 1,
                    stochastic_depth_rate=drop_rates[index], dtype=self.dtype,
                    bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                    leaky_relu_slope=self.leaky_relu_slope, name=f'block_{index + 1}')(x, train)
                x = constrain(x, IMAGE_AXES)
                index += 1

        x = batch_norm(train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, name='head_bn')(x)
        x = nn.leaky_relu(x, negative_slope=self.leaky_relu_slope)
        x = jnp.mean(x, axis=(1, 2))
        x = constrain(x, DENSE_AXES)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = classifier(self.num_classes, dtype=self.dtype, kernel_init=official_dense_init)(x)
        return x.astype(jnp.float32)
