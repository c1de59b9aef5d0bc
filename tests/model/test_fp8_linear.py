"""The FP8 switch in the model: ``linear`` and the grouped matmul under ``gemm_recipe`` (model/linear.py).

The recipe's arithmetic is tested against its oracle in tests/kernels_pallas/test_fp8.py; here:
that ``linear`` hands the right [M, K] x [K, N] flattening to it for every spec the model uses,
that every engine of the grouped matmul computes the same quantized products, and the config switch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.fp8 import fp8_matmul, grouped_fp8_matmul, quantize_weights
from kernels_pallas.fp8.ops import quantize_activations
from model.config import ModelConfig
from model.grouped_matmul import gmm
from model.linear import QuantizedWeight, linear
from tests.tolerances import assert_close

# (spec, x shape, w shape, x -> [M, K] flattening): MLA's projections, SwiGLU's "...", and "bhtv,hvd->btd"
# whose contracted letters are not trailing in x.
SPECS = [
    ("btq,qhk->bthk", (2, 3, 24), (24, 2, 12), lambda x: x.reshape(6, 24)),
    ("bhtv,hvd->btd", (2, 2, 3, 8), (2, 8, 32), lambda x: x.transpose(0, 2, 1, 3).reshape(6, 16)),
    ("...f,fd->...d", (2, 3, 48), (48, 32), lambda x: x.reshape(6, 48)),
]


@pytest.mark.parametrize("spec,xs,ws,flat", SPECS)
def test_linear_fp8_is_the_flattened_recipe(spec, xs, ws, flat):
    """Forward and both gradients equal ``fp8_matmul`` on the spec's [M, K] x [K, N] flattening
    (a wrong transpose, e.g. flattening "bhtv" without moving h next to v, mixes channels of
    different tiles and fails); "bf16" stays the plain einsum."""
    x = jax.random.normal(jax.random.key(0), xs, jnp.float32)
    w = jax.random.normal(jax.random.key(1), ws, jnp.float32) / 4
    y, vjp = jax.vjp(lambda a, b: linear(spec, a, b, dtype=jnp.float32, recipe="fp8"), x, w)
    k = flat(x).shape[1]
    y_ref, vjp_ref = jax.vjp(lambda a, b: fp8_matmul(flat(a), b.reshape(k, -1)), x, w)
    g = jax.random.normal(jax.random.key(2), y.shape, jnp.float32)
    np.testing.assert_array_equal(np.asarray(y).reshape(y_ref.shape), y_ref)
    for a, b in zip(vjp(g), vjp_ref(g.reshape(y_ref.shape))):
        np.testing.assert_array_equal(a, b)
    assert_close(linear(spec, x, w, dtype=jnp.float32), jnp.einsum(spec, x, w))
    with pytest.raises(ValueError, match="recipe must be one of"):
        linear(spec, x, w, dtype=jnp.float32, recipe="fp4")


def test_linear_takes_an_already_quantized_weight():
    """A ``QuantizedWeight`` (e4m3 + 128x128 scales, e.g. an FP8 checkpoint kept as is) gives the
    same forward as quantizing the f32 weight inside ``linear``; under "bf16" it is dequantized."""
    x = jax.random.normal(jax.random.key(3), (2, 3, 40), jnp.float32)
    w = jax.random.normal(jax.random.key(4), (40, 136), jnp.float32) / 8
    q, s = quantize_weights(jnp.pad(w, ((0, 88), (0, 120))), impl="xla")  # [128, 256], [1, 2]
    qw = QuantizedWeight(q[:40, :136], s)
    y = linear("btd,dn->btn", x, qw, dtype=jnp.float32, recipe="fp8")
    np.testing.assert_array_equal(y, linear("btd,dn->btn", x, w, dtype=jnp.float32, recipe="fp8"))
    w_deq = np.asarray(q[:40, :136], np.float32) * np.repeat(np.repeat(np.asarray(s), 128, 0), 128, 1)[:40, :136]
    assert_close(linear("btd,dn->btn", x, qw, dtype=jnp.float32), jnp.einsum("btd,dn->btn", x, w_deq))
    # "int8" with the kept e4m3 weight: int8 activations (1x128 tiles) times the weight as stored
    x_q, x_s = quantize_activations(jnp.pad(x.reshape(6, 40), ((0, 0), (0, 88))), fmt="int8")  # [6, 128], [6, 1]
    assert x_q.dtype == jnp.int8
    x_deq = (np.asarray(x_q, np.float32) * np.asarray(x_s))[:, :40].reshape(2, 3, 40)
    y8 = linear("btd,dn->btn", x, qw, dtype=jnp.float32, recipe="int8")
    assert_close(y8, jnp.einsum("btd,dn->btn", x_deq, w_deq))


@pytest.mark.parametrize("recipe", ["fp8", "int8"])
def test_grouped_recipe_same_on_every_xla_engine(recipe):
    """model.grouped_matmul.gmm under a quantized recipe: the "scan" engine (CPU default) and
    "ragged_dot" compute the same quantized products as ``grouped_fp8_matmul``'s own default,
    forward and gradients, with an empty expert and rows of no expert; under "bf16" gmm is unchanged."""
    sizes = jnp.asarray([5, 0, 9, 3], jnp.int32)  # 17 of 20 rows owned
    x = jax.random.normal(jax.random.key(5), (20, 24), jnp.float32)
    w = jax.random.normal(jax.random.key(6), (4, 24, 40), jnp.float32) / 4
    g = jax.random.normal(jax.random.key(7), (20, 40), jnp.float32)
    want_y, vjp = jax.vjp(lambda a, b: grouped_fp8_matmul(a, b, sizes, fmt=recipe, impl="xla"), x, w)
    want = (want_y, *vjp(g))
    for impl in ("scan", "ragged_dot"):
        y, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, impl=impl, tile=8, recipe=recipe), x, w)
        for got, ref in zip((y, *vjp(g)), want):
            assert_close(got, ref, composite=True, err_msg=impl)
    assert not np.asarray(want[2])[1].any()
    assert_close(gmm(x, w, sizes, impl="scan", tile=8), jax.lax.ragged_dot(x, w, sizes))


def test_gemm_recipe_is_a_validated_execution_field():
    """Validated against model.linear.RECIPES; not part of the model's identity, so a checkpoint
    written under one recipe resumes under another."""
    with pytest.raises(ValueError, match="gemm_recipe must be one of"):
        ModelConfig(gemm_recipe="fp4")
    assert ModelConfig(gemm_recipe="fp8").identity() == ModelConfig().identity()
