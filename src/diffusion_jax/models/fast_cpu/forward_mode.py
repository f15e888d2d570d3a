"""A one-line error, naming the switch, for forward-mode autodiff through the fast kernels.

The kernels' gradients are `jax.custom_vjp` rules, which JAX can only transpose (reverse mode:
grad, vjp, jacrev). `reverse_mode_only` marks each input of a kernel with an identity whose
tangent passes through `no_forward_mode_p`: a primitive that raises this module's message when it
is evaluated or lowered, and whose transpose is the identity. In reverse mode the tangent program
is transposed before it runs, so the primitive disappears and the kernels' own VJPs run as before.
In forward mode (jvp, jacfwd, linearize, hessian's outer pass) the tangent program runs, and the
primitive comes before the custom_vjp's own error in it: eagerly, under jit, inside scans and
conds, and in programs traced before the jvp. Lowered for a platform whose
`lax.platform_dependent` branch does not hold the kernels (model.kernels='auto' off the CPU), the
primitive is never lowered and forward mode works.
"""

from __future__ import annotations

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

MESSAGE = (
    "forward-mode autodiff (jvp, jacfwd, linearize) is not supported by the fast CPU kernels "
    "(model.kernels='fast_cpu', or 'auto' on CPU in float32); set config.model.kernels='xla'"
)


def _raise(*_, **__):
    raise TypeError(MESSAGE)


no_forward_mode_p = Primitive("fast_cpu_no_forward_mode")
no_forward_mode_p.def_impl(_raise)
no_forward_mode_p.def_abstract_eval(lambda t: t)
mlir.register_lowering(no_forward_mode_p, _raise)
ad.deflinear2(no_forward_mode_p, lambda ct, _: [ct])
batching.primitive_batchers[no_forward_mode_p] = lambda args, dims: (
    no_forward_mode_p.bind(*args),
    dims[0],
)


@jax.custom_jvp
def _mark(x):
    return x


@_mark.defjvp
def _mark_jvp(primals, tangents):
    return primals[0], no_forward_mode_p.bind(tangents[0])


def reverse_mode_only(f):
    """f(*arrays), with forward-mode autodiff through it raising MESSAGE."""

    def marked(*args):
        return f(*map(_mark, args))

    return marked
