"""Time the MoE layer's forward + backward as the number of routed experts grows.

  python -m tools.bench_moe [--experts=8,32,128] [--tokens=4096] [--top_k=4] [--d_model=256] [--ffn=128]

With k, d, f and tokens fixed the activated FLOPs are fixed, so a grouped (activated-FLOPs)
dispatch should cost about the same at every E, while a dense-over-all-experts design grows
~E-fold. Prints one JSON line per E with keys ``experts`` and ``ms`` (median over repeats), plus
the dense reference's time at the smallest E for scale (``impl: dense_reference``).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from model.config import ModelConfig
from model.moe import MoE

_EXPERTS = flags.DEFINE_list("experts", ["8", "32", "128"], "Routed expert counts to time.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call (batch x length).")
_TOP_K = flags.DEFINE_integer("top_k", 4, "Experts per token.")
_D = flags.DEFINE_integer("d_model", 256, "Model width.")
_F = flags.DEFINE_integer("ffn", 128, "Hidden width of each expert.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per point (after one warm-up).")
_DENSE = flags.DEFINE_bool("dense_reference", True, "Also time the dense einsum over all experts at the smallest E.")


def _time(fn, *args):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _dense_all_experts(moe, x, seg):
    """Every expert on every token (what a dense dispatch costs): the growth we avoid."""
    xt = x.reshape(-1, x.shape[-1])
    r = moe.router(xt, seg.reshape(-1) != 0)
    w = jnp.zeros((xt.shape[0], moe.cfg.n_routed_experts)).at[jnp.arange(xt.shape[0])[:, None], r.ids].add(r.gates)
    h = jax.nn.silu(jnp.einsum("md,edf->emf", xt, moe.w_gate[...])) * jnp.einsum("md,edf->emf", xt, moe.w_up[...])
    y = jnp.einsum("emf,efd->emd", h, moe.w_down[...])
    return jnp.einsum("emd,me->md", y, w).reshape(x.shape)


def main(argv):
    del argv
    t = _TOKENS.value
    x = jax.random.normal(jax.random.key(0), (1, t, _D.value))
    seg = jnp.ones((1, t), jnp.int32)
    for i, e in enumerate(int(v) for v in _EXPERTS.value):
        cfg = ModelConfig(
            d_model=_D.value,
            moe_ffn_dim=_F.value,
            n_routed_experts=e,
            n_experts_per_tok=_TOP_K.value,
            n_shared_experts=0,
            n_group=1,
            topk_group=1,
        )
        graphdef, params, rest = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss(params, rest, x, fwd):
            moe = nnx.merge(graphdef, params, rest)
            return jnp.sum(fwd(moe, x) ** 2)

        def grouped(moe, x):
            return moe(x, seg)[0]

        step = jax.jit(jax.grad(lambda p, r, x: loss(p, r, x, grouped), argnums=(0, 2)))
        print(
            json.dumps(
                {
                    "experts": e,
                    "ms": round(_time(step, params, rest, x), 3),
                    "impl": "grouped",
                    "tokens": t,
                    "top_k": _TOP_K.value,
                    "d_model": _D.value,
                    "ffn": _F.value,
                    "backend": jax.default_backend(),
                }
            ),
            flush=True,
        )
        if i == 0 and _DENSE.value:
            dense = jax.jit(
                jax.grad(lambda p, r, x: loss(p, r, x, lambda m, x: _dense_all_experts(m, x, seg)), argnums=(0, 2))
            )
            print(
                json.dumps(
                    {
                        "experts": e,
                        "ms": round(_time(dense, params, rest, x), 3),
                        "impl": "dense_reference",
                        "tokens": t,
                        "top_k": _TOP_K.value,
                        "backend": jax.default_backend(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
