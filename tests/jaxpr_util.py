"""Reading traced programs in tests: the precision each matmul and convolution asks for, and
what the modules of a training pass see (traced only, nothing compiled)."""

import flax.linen as nn
import jax

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def matmul_precisions(jaxpr) -> list:
  """`precision` of every dot_general and conv_general_dilated in a (Closed)Jaxpr, sub-jaxprs
  (jit, custom_vjp, remat, ...) included, in program order; None = the default."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      found.append(eqn.params['precision'])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found += matmul_precisions(inner)
  return found


def traced_training_pass(model, x, interceptor):
  """Runs `interceptor` (nn.intercept_methods) through a training pass of `model` on `x`,
  traced only: nothing is compiled. Returns the abstract (logits, batch_stats)."""
  def train(variables, key):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=True, rngs={'dropout': key},
                         mutable=['batch_stats'])
  return jax.eval_shape(train, jax.eval_shape(model.init, jax.random.key(0), x),
                        jax.random.key(1))
