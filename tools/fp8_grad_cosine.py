"""Whole-model gradient under ``gemm_recipe="fp8"`` against the plain recipe: cosine per parameter tensor.

  python -m tools.fp8_grad_cosine                                  # compare_fp8's model at init, 16 x 128 tokens
  python -m tools.fp8_grad_cosine --checkpoint=runs/fp8_compare/seed1/bf16   # ... at that run's final state
  python -m tools.fp8_grad_cosine --tiny                           # tests/util.py's TINY model

The loss is the training loss (main + 0.3 x MTP + 1e-4 x sequence-wise balance, the trainer's
defaults; ``model.loss.lm_losses``) on one batch of the validation split (16 x 128 byte tokens by
default; ``--tiny``: the bytes of this file modulo its vocabulary). The fp8 gradient is measured
three ways against the plain one (issue #10's acceptance: cosine >= 0.99 per tensor):

  free:    each recipe routes its own tokens; FP8 moves the router's input by the format's error,
           which flips some top-k choices (a token's gradient then goes to another expert);
  pinned:  both recipes use the plain run's expert choices (the gates are recomputed from each
           run's own scores at those ids, as ``route`` does), which leaves the GEMM numerics alone;
  backward: the forward products exact (f32) and the two backward products (dgrad, wgrad) in FP8
           as the recipe computes them, from the same quantized residuals (``fp8_backward_only``):
           the gradient computation's own error, at the plain model's point.

Pinning swaps ``model.moe.route`` and the backward-only ablation swaps the custom-VJP functions of
``kernels_pallas.fp8.ops``, each for the duration of one trace: measurement devices of this tool
(and tests/model/test_fp8_model.py), not switches of the model. Prints the fraction of tokens whose
top-k set differs between the recipes per MoE layer, each tensor below ``--show`` (default 0.99)
with the three cosines, a summary and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model.moe as moe_lib
from kernels_pallas.fp8 import ops as fp8_ops
from kernels_pallas.router.reference import gates_from_ids
from model.config import ModelConfig
from model.loss import lm_losses
from model.router import router_config
from model.transformer import Transformer


@contextlib.contextmanager
def _route_with(pinned, seen: list):
    """``model.moe.route`` that appends each MoE layer's ids to ``seen`` (in call order) and, if
    ``pinned`` is given, routes layer i to ``pinned[i]`` instead of its own top-k."""
    original = moe_lib.route

    def route(logits, bias, cfg, valid=None):
        r = original(logits, bias, cfg, valid)
        if pinned is not None:
            ids = pinned[len(seen)]
            r = r._replace(ids=ids, gates=gates_from_ids(r.scores, ids, router_config(cfg)))
        seen.append(r.ids)
        return r

    moe_lib.route = route
    try:
        yield
    finally:
        moe_lib.route = original


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _exact_dense(x, w, fmt, pow2_scale, out_dtype, interpret, impl):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)  # [m, n]


def _exact_dense_fwd(x, w, *static):
    return _exact_dense(x, w, *static), fp8_ops._fp8_matmul_fwd(x, w, *static)[1]  # the recipe's residuals


_exact_dense.defvjp(_exact_dense_fwd, fp8_ops._fp8_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _exact_grouped(x, w, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product):
    owned = (jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None]  # [m, 1]
    return product(jnp.where(owned, x, 0), w, group_sizes).astype(out_dtype)  # [m, n]


def _exact_grouped_fwd(x, w, group_sizes, *static):
    y = _exact_grouped(x, w, group_sizes, *static)
    return y, fp8_ops._grouped_fp8_matmul_fwd(x, w, group_sizes, *static)[1]


_exact_grouped.defvjp(_exact_grouped_fwd, fp8_ops._grouped_fp8_matmul_bwd)


@contextlib.contextmanager
def fp8_backward_only():
    """While active, ``gemm_recipe="fp8"`` computes its forward products exactly (f32) and only its
    dgrad and wgrad in FP8 (the recipe's own backward rules and quantized residuals)."""
    saved = fp8_ops._fp8_matmul, fp8_ops._grouped_fp8_matmul
    fp8_ops._fp8_matmul, fp8_ops._grouped_fp8_matmul = _exact_dense, _exact_grouped
    try:
        yield
    finally:
        fp8_ops._fp8_matmul, fp8_ops._grouped_fp8_matmul = saved


def gradients(cfg: ModelConfig, params, rest, batch: dict, pinned=None):
    """({tensor path: flat f64 gradient}, [per MoE layer: ids [m, k]]) of the training loss."""
    graph = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0)))  # only the structure; weights come in

    def loss(p):
        seen = []
        with _route_with(pinned, seen):
            out = nnx.merge(graph, p, rest, copy=True)(
                batch["inputs"], batch["positions"], batch["segment_ids"], train=True
            )
        ls = lm_losses(out, batch, 0.3)
        return ls["main_loss"] + ls["mtp_loss"] + 1e-4 * out.aux["balance_loss"], seen

    g, ids = jax.jit(jax.grad(loss, has_aux=True))(params)
    flat = {
        "/".join(map(str, k)): np.asarray(v.get_value(), np.float64).ravel()
        for k, v in dict(nnx.to_flat_state(g)).items()
    }
    return flat, ids


MODES = ("free", "pinned", "backward")


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(cfg: ModelConfig, params, rest, batch: dict) -> dict:
    """Per tensor: cosine of the fp8 gradient with the plain one in each of ``MODES``; router flips."""
    plain, ids = gradients(dataclasses.replace(cfg, gemm_recipe="bf16"), params, rest, batch)
    fp8 = dataclasses.replace(cfg, gemm_recipe="fp8")
    free, ids_fp8 = gradients(fp8, params, rest, batch)
    pinned, _ = gradients(fp8, params, rest, batch, pinned=ids)
    with fp8_backward_only():
        backward, _ = gradients(fp8, params, rest, batch)
    flips = [float(np.mean(np.any(np.sort(a, -1) != np.sort(b, -1), -1))) for a, b in zip(ids, ids_fp8)]
    out = dict(flips=flips)
    for name, g in (("free", free), ("pinned", pinned), ("backward", backward)):
        per = {k: cosine(plain[k], g[k]) for k in plain}
        v = np.array(list(per.values()))
        whole = cosine(np.concatenate(list(plain.values())), np.concatenate([g[k] for k in plain]))
        out[name] = dict(
            per_tensor=per, whole=whole, min=float(v.min()), median=float(np.median(v)), below=int((v < 0.99).sum())
        )
    out["n_tensors"] = len(plain)
    return out


def _tiny_setup(b: int, t: int):
    from tests.util import TINY  # the tests' tiny model (repository checkout only)

    cfg = ModelConfig(**TINY)
    data = np.frombuffer(open(__file__, "rb").read()[: b * (t + 1)], np.uint8).astype(np.int32)
    ids = data.reshape(b, t + 1) % cfg.vocab_size
    batch = dict(
        inputs=jnp.asarray(ids[:, :-1]),
        targets=jnp.asarray(ids[:, 1:]),
        loss_mask=jnp.ones((b, t), jnp.float32),
        segment_ids=jnp.ones((b, t), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
    )
    _, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return cfg, params, rest, batch


def _compare_fp8_setup(b: int, t: int, checkpoint: str | None):
    from tools.compare_fp8 import make_config
    from train import data as data_lib
    from train.checkpoint import Checkpointer
    from train.optimizer import make_optimizer
    from train.state import abstract_state

    conf = make_config("bf16", steps=1, batch=b, seq_len=t, eval_every=1, eval_batches=1)
    cfg = ModelConfig.from_dict(conf.model.to_dict())
    if checkpoint:
        _, abstract = abstract_state(cfg, make_optimizer(conf.optimizer, 1), 0)
        ckpt = Checkpointer(f"{checkpoint}/checkpoints", save_every=1, async_save=False, read_only=True)
        try:
            got = ckpt.restore(abstract)
        finally:
            ckpt.close()
        if got is None:
            raise SystemExit(f"error: no checkpoint in {checkpoint}/checkpoints")
        params, rest = got[1]["params"], got[1]["rest"]
    else:
        _, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    batch = {
        k: jnp.asarray(v) for k, v in data_lib.make_eval_batches(conf.data, batch_size=b, num_batches=1)[0].items()
    }
    return cfg, params, rest, batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tests/util.py's TINY model at init (else compare_fp8's)")
    p.add_argument("--checkpoint", default=None, help="a compare_fp8 run dir: its final state instead of init")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--show", type=float, default=0.99, help="print the tensors below this cosine")
    a = p.parse_args(argv)
    if a.tiny:
        cfg, params, rest, batch = _tiny_setup(a.batch, a.seq_len)
    else:
        cfg, params, rest, batch = _compare_fp8_setup(a.batch, a.seq_len, a.checkpoint)
    r = compare(cfg, params, rest, batch)
    print(f"router top-k set changed by fp8, per MoE layer: {', '.join(f'{100 * f:.1f}%' for f in r['flips'])}")
    print("| tensor | free | pinned | backward only |\n|---|---|---|---|")
    for k in r["free"]["per_tensor"]:
        cs = [r[n]["per_tensor"][k] for n in MODES]
        if min(cs) < a.show:
            print(f"| {k} | " + " | ".join(f"{c:.4f}" for c in cs) + " |")
    for name in MODES:
        s = r[name]
        print(
            f"{name}: per tensor min {s['min']:.4f}, median {s['median']:.4f}, {s['below']}/{r['n_tensors']} below "
            f"0.99; whole gradient {s['whole']:.4f}"
        )
    summary = {n: {k: v for k, v in r[n].items() if k != "per_tensor"} for n in MODES}
    tag = "tiny" if a.tiny else "compare_fp8" + (f":{a.checkpoint}" if a.checkpoint else ":init")
    print(
        json.dumps(
            dict(model=tag, batch=a.batch, seq_len=a.seq_len, flips=r["flips"], n_tensors=r["n_tensors"], **summary)
        )
    )
    return r


if __name__ == "__main__":
    main()
