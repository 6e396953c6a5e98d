"""Multi-layer perceptron (the MPL paper's TwoMoons teacher and student, and test models).

The paper's TwoMoons networks: two hidden layers of 8 sigmoid units, every weight and bias drawn
from U(-0.1, 0.1): `MLP(num_classes=2, initializer='uniform')` with the other defaults.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpl.sharding import constrain
from mpl.models.wide_resnet import DENSE_AXES, classifier

ACTIVATIONS = {
    'sigmoid': nn.sigmoid,
    'relu': nn.relu,
    'tanh': jnp.tanh,
    'gelu': nn.gelu,
}
INITIALIZERS = ('lecun', 'uniform')


def _uniform(scale: float):
    """U(-scale, scale) initialiser."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class MLP(nn.Module):
    """Dense -> activation for each hidden size, dropout, dense classifier.

    Inputs of any rank are flattened beyond the batch axis. `initializer='lecun'`: LeCun-normal
    kernels, zero biases. `initializer='uniform'`: kernels and biases U(-init_scale, init_scale).
    (The field cannot be called `init`: that would shadow `nn.Module.init`.)
    """
    num_classes: int
    hidden_sizes: Sequence[int] = (8, 8)
    activation: str = 'sigmoid'
    initializer: str = 'lecun'
    init_scale: float = 0.1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f'Unknown activation {self.activation!r}; '
                             f'valid: {sorted(ACTIVATIONS)}.')
        if self.initializer not in INITIALIZERS:
            raise ValueError(f'Unknown initializer {self.initializer!r}; '
                             f'valid: {list(INITIALIZERS)}.')
        if self.initializer == 'uniform':
            kernel_init = bias_init = _uniform(self.init_scale)
        else:
            kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros
        act = ACTIVATIONS[self.activation]

        x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
        x = constrain(x, DENSE_AXES)
        for i, size in enumerate(self.hidden_sizes):
            x = nn.Dense(
                size, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(
                    kernel_init, ('features_in', 'features')),
                bias_init=nn.with_logical_partitioning(bias_init, ('features',)),
                name=f'hidden_{i}')(x)
            x = constrain(act(x), DENSE_AXES)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = classifier(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                       bias_init=bias_init)(x)
        return x.astype(jnp.float32)
