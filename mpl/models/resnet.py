"""Bottleneck ResNet v1.5 (ResNet-50 for ImageNet).

- Stem: 7x7 conv stride 2 (padding 3) -> BN -> ReLU -> 3x3 max-pool stride 2 (padding 1).
- Bottleneck block: 1x1 conv -> BN -> ReLU -> 3x3 conv (the stride sits here: "v1.5") -> BN ->
  ReLU -> 1x1 conv (4x width) -> BN with zero-initialised scale (Goyal et al. 2017), added to the
  shortcut, then ReLU. Projection shortcut 1x1 conv (stride) + BN when the shape changes.
- Convs without bias, He-normal fan-out init (as torchvision and the official MPL code);
  symmetric padding as torchvision (TF's SAME would pad stride-2 convs asymmetrically).
- BN momentum 0.9, epsilon 1e-5; classifier N(0, 0.01) kernel, zero bias (Goyal et al.).
- Head: global average pool -> dropout -> dense -> float32 logits.
- Optional per-example stochastic depth on identity-shortcut blocks, same schedule as
  `wide_resnet.py`.

The official MPL ResNet-50 (`ResNet50` and `resnet_block` in google-research/google-research
`meta_pseudo_labels/`) differs in four settings, each a field here; the ImageNet MPL configs set
all four: `bn_momentum=0.99, bn_epsilon=1e-3` (its flags), `zero_init_residual=False` (every
batch-norm scale starts at 1), `classifier_init='official'` (U(+-1/sqrt(classes)), as the WRN)
and `padding='SAME'` (TF's: the 7x7/2 stem pads (2, 3) at 224, stride-2 3x3 convs and the
max-pool (0, 1)).

ResNet-50 with 1000 classes has 25,557,032 parameters. 32x32 inputs work too (the last stage
runs at 1x1), though they are not what this net is for.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpl.errors import ConfigError
from mpl.sharding import constrain
from mpl.models.wide_resnet import (DENSE_AXES, IMAGE_AXES, StochasticDepth, batch_norm,
                                    classifier, conv, official_dense_init,
                                    stochastic_depth_rates)


PADDINGS = ('symmetric', 'SAME')
CLASSIFIER_INITS = {'normal': nn.initializers.normal(0.01), 'official': official_dense_init}


def _padding(kind: str, pad: int):
    """'symmetric': `pad` pixels on each side (torchvision); 'SAME': TF's (asymmetric when
    strided)."""
    if kind not in PADDINGS:
        raise ConfigError(f'unknown padding {kind!r}; valid choices: {list(PADDINGS)}')
    return 'SAME' if kind == 'SAME' else ((pad, pad), (pad, pad))


class BottleneckBlock(nn.Module):
    """ResNet v1.5 bottleneck; `features` is the bottleneck width (output is 4x)."""
    features: int
    strides: int
    stochastic_depth_rate: float
    dtype: Any
    bn_momentum: float
    bn_epsilon: float
    zero_init_residual: bool
    padding: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name, zero_scale=False: batch_norm(
            train, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
            name=name, zero_scale=zero_scale)
        out_features = 4 * self.features

        y = conv(self.features, 1, dtype=self.dtype, name='conv_1')(x)
        y = nn.relu(bn('bn_1')(y))
        y = conv(self.features, 3, self.strides, padding=_padding(self.padding, 1),
                 dtype=self.dtype, name='conv_2')(y)
        y = nn.relu(bn('bn_2')(y))
        y = conv(out_features, 1, dtype=self.dtype, name='conv_3')(y)
        y = bn('bn_3', zero_scale=self.zero_init_residual)(y)

        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = conv(out_features, 1, self.strides, padding='VALID', dtype=self.dtype,
                            name='shortcut_conv')(x)
            shortcut = bn('shortcut_bn')(shortcut)
        else:
            shortcut = x
            y = StochasticDepth(self.stochastic_depth_rate)(y, deterministic=not train)
        return nn.relu(shortcut + y)


class ResNet(nn.Module):
    """Bottleneck ResNet with `stage_sizes` blocks per stage; float32 logits (N, classes)."""
    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)  # ResNet-50
    num_filters: int = 64
    dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False      # recompute each block's activations in the backward pass
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = True   # each block's last BN scale starts at 0 (Goyal et al.)
    classifier_init: str = 'normal'   # 'normal': N(0, 0.01); 'official': the MPL code's
    padding: str = 'symmetric'        # 'symmetric' (torchvision) or 'SAME' (TF, the MPL code)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.classifier_init not in CLASSIFIER_INITS:
            raise ConfigError(f'unknown classifier_init {self.classifier_init!r}; valid choices: '
                             f'{list(CLASSIFIER_INITS)}')
        drop_rates = stochastic_depth_rates(self.stochastic_depth_rate, sum(self.stage_sizes))

        x = constrain(jnp.asarray(x, self.dtype), IMAGE_AXES)
        x = conv(self.num_filters, 7, 2, padding=_padding(self.padding, 3), dtype=self.dtype,
                 name='stem_conv')(x)
        x = batch_norm(train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, name='stem_bn')(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_padding(self.padding, 1))
        x = constrain(x, IMAGE_AXES)

        # remat: keep only block inputs for the backward pass (memory for compute).
        block_class = nn.remat(BottleneckBlock, static_argnums=(2,)) if self.remat else BottleneckBlock
        index = 0
        for stage, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                x = block_class(
                    features=self.num_filters * 2 ** stage,
                    strides=2 if stage > 0 and b == 0 else 1,
                    stochastic_depth_rate=drop_rates[index], dtype=self.dtype,
                    bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                    zero_init_residual=self.zero_init_residual, padding=self.padding,
                    name=f'block_{index + 1}')(x, train)
                x = constrain(x, IMAGE_AXES)
                index += 1

        x = jnp.mean(x, axis=(1, 2))
        x = constrain(x, DENSE_AXES)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = classifier(self.num_classes, dtype=self.dtype,
                       kernel_init=CLASSIFIER_INITS[self.classifier_init])(x)
        return x.astype(jnp.float32)


class ResNet50(ResNet):
    """ResNet-50 v1.5: stages of 3, 4, 6, 3 bottleneck blocks."""
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
