"""The whole model's gradient under ``gemm_recipe="fp8"`` against the plain recipe (issue #10).

Issue #10 asks for a cosine >= 0.99 per parameter tensor. Measured (``python -m tools.fp8_grad_cosine``,
the training loss, the plain recipe in f32 on CPU; docs/benchmarks.md "FP8 training (issue #10)"):

  full recipe, whole model: NOT met. TINY at init (``--tiny --batch=4 --seq_len=32``): min 0.74,
    median 0.953, 65/67 tensors below 0.99; compare_fp8's model (d 128, 16 x 128 validation
    tokens) at init: min 0.906, median 0.991, 26/83 below; after 300 bf16 steps (seed 1):
    min 0.968, median 0.990, 47/83 below;
  routing pinned (both recipes use the plain run's top-k choices): TINY min 0.954, 55/67 below;
    compare_fp8's model min 0.972, 12/83 below (init), min 0.979, 19/83 below (trained);
  forward exact, dgrad and wgrad in FP8: every tensor >= 0.99 (TINY: min 0.992, median 0.998,
    asserted below; compare_fp8's model: min 0.995 at init, 0.998 trained, median 0.999).

So the recipe's backward products are as accurate as the bound asks, on every tensor of the whole
model; what lowers the full recipe's figures is its FORWARD: FP8 fprop moves every GEMM output by
a few percent (the e4m3 floor), which (a) flips the router's top-k set of 4-21% of the tokens per
MoE layer at init, 2-4% after training (a token's gradient then goes to another expert:
free vs pinned above), and (b) evaluates the gradient at a slightly different point of a nonlinear
network; the softmax backward of near-uniform attention (the query path: wq_a, wq_b, q_norm, with
the routers the lowest tensors) and the norm scales are sums that cancel to a fraction of their
terms, which multiplies that relative change. With fprop in FP8 and the backward exact (a scratch
ablation, docs) the figures are the full recipe's (routing pinned: min 0.981 against 0.980).

Asserted here: one dense block, full recipe, per tensor >= 0.99 except the RMSNorm scales (0.987);
the whole TINY model with the FP8 backward, every tensor >= 0.99.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import Transformer
from tests.tolerances import assert_close
from tests.util import tiny_config

TEXT = (
    b"DeepSeek-V3 adopts a fine-grained mixed precision framework: most compute-dense operations run "
    b"in FP8, while a few key operations keep their original data formats to balance efficiency and "
    b"numerical stability. Activations are scaled per 1x128 tile and weights per 128x128 block. "
)


def _grads(recipe: str, tokens):
    model = Transformer(tiny_config(n_layers=1, first_k_dense=1, mtp_depth=0, gemm_recipe=recipe), rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graph, p, rest)(tokens[:, :-1]).logits  # [b, t, V]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    return dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(params)))


def test_one_block_gradient_fp8_vs_plain_cosine_per_tensor():
    tokens = jnp.asarray([[c % 64 for c in TEXT[i * 40 : i * 40 + 33]] for i in range(4)])  # [4, 33]
    plain, fp8 = _grads("bf16", tokens), _grads("fp8", tokens)
    assert plain.keys() == fp8.keys()
    flat = {k: [] for k in ("plain", "fp8")}
    for path, g in plain.items():
        a, b = (np.asarray(v.get_value(), np.float64).ravel() for v in (g, fp8[path]))
        assert not np.array_equal(a, b), path  # the recipe reached this tensor's gradient
        flat["plain"].append(a)
        flat["fp8"].append(b)
        if path[-1] != "scale":  # RMSNorm scales: see the module docstring
            assert _cos(a, b) >= 0.99, (path, _cos(a, b))
    assert _cos(np.concatenate(flat["plain"]), np.concatenate(flat["fp8"])) >= 0.99


def _cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_whole_model_fp8_backward_gradient_cosine_per_tensor():
    """The whole TINY model (dense block, 2 MoE blocks, MTP; the training loss: main + MTP + balance):
    with the forward products exact and dgrad / wgrad in FP8 as the recipe computes them
    (``tools.fp8_grad_cosine.fp8_backward_only``), every parameter tensor's gradient is >= 0.99
    cosine-close to the plain one (the tool on TINY: min 0.992, median 0.998 over the 67 tensors). The full
    recipe does not reach that bound on this model (module docstring): its forward moves the point
    at which the gradient is taken."""
    from tools import fp8_grad_cosine as tool

    cfg = tiny_config()
    _, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    ids = jnp.asarray([[c % 64 for c in TEXT[i * 40 : i * 40 + 33]] for i in range(4)])  # [4, 33]
    batch = dict(
        inputs=ids[:, :-1],
        targets=ids[:, 1:],
        loss_mask=jnp.ones((4, 32), jnp.float32),
        segment_ids=jnp.ones((4, 32), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(32), (4, 32)),
    )
    plain, _ = tool.gradients(cfg, params, rest, batch)
    with tool.fp8_backward_only():
        fp8, _ = tool.gradients(cfg.replace(gemm_recipe="fp8"), params, rest, batch)
    assert plain.keys() == fp8.keys() and len(plain) == 67
    cos = {k: _cos(plain[k], fp8[k]) for k in plain}
    low = {k: c for k, c in cos.items() if c < 0.99}
    assert not low, low
    assert np.median(list(cos.values())) < 0.9999  # the FP8 backward really ran (plain would give ~1)


def test_fp8_decoding_equals_fp8_forward_and_generates():
    """Under "fp8" the cached decode (naive cache: every projection through ``linear``, experts through
    the layer's grouped FP8 matmul) gives the full forward's logits token by token: activations are
    scaled per token (1x128 tiles), so a token's product does not depend on the others in its step.
    (With the absorbed cache W_UK / W_UV fold into the attention core, plain: ~FP8-error close only.)
    Then greedy generation runs and returns tokens."""
    from tests.model.test_decode import CFG, _forward, _teacher_forced

    model = Transformer(CFG.replace(gemm_recipe="fp8"), rngs=nnx.Rngs(1))
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 6)).astype(np.int32)
    assert_close(_teacher_forced(model, ids, "naive"), _forward(model, ids), composite=True)
