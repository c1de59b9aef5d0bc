"""The DeepSeek-V3-style decoder: embedding, ``first_k_dense`` dense blocks, MoE blocks, final
RMSNorm, output head (untied, or the embedding^T with ``tie_word_embeddings``), and ``mtp_depth``
MTP modules sharing the embedding and head. A dense model (Llama, Qwen2.5) has first_k_dense = n_layers.

``Transformer(cfg, rngs=...)(inputs, positions, segment_ids)`` -> ``ModelOutput``. With
``cfg.scan_layers`` the MoE blocks are one stacked module run by ``nnx.scan`` (one compiled body);
``cfg.remat`` names the rematerialisation policy applied to every block.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from model.block import Block, add_aux, zero_aux
from model.config import ModelConfig
from model.mtp import MTPModule, shift_left
from model.norms import RMSNorm
from model.params import param

_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
    logits: jax.Array  # [b, t, V] f32, predicts targets[:, i] = t_{i+1}
    mtp_logits: Optional[jax.Array]  # [D, b, t, V] f32, depth k predicts t_{i+k+1}; None if D = 0
    hidden: jax.Array  # [b, t, d] final-normed hidden state
    # balance_loss (sum over MoE layers, unweighted), dropped (count), expert_load [MoE layers (+ MTP), e]
    # (assignments per expert in the global batch, rows in ``model.balance.routers`` order)
    aux: dict


def _call_block(block: Block, x, positions, segment_ids, remat: str, train: bool, ep):
    if remat == "none":
        return block(x, positions, segment_ids, train=train, ep=ep)
    fn = nnx.remat(lambda blk, x, p, s: blk(x, p, s, train=train, ep=ep), policy=_POLICIES[remat])
    return fn(block, x, positions, segment_ids)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v, pd = cfg.d_model, cfg.vocab_size, cfg.param_dtype
        # Tied, the embedding is also the head: initialised at the head's scale d^-1/2 (a unit-variance
        # one would give logits of std sqrt(d)); the blocks start with an RMSNorm, so its scale is free.
        tied = cfg.tie_word_embeddings
        self.embed = param(None, (v, d), pd, ("vocab", "embed"), rngs=rngs, stddev=d**-0.5 if tied else 1.0)
        self.dense_blocks = nnx.List([Block(cfg, moe=False, rngs=rngs) for _ in range(cfg.first_k_dense)])
        n_moe = cfg.n_moe_layers
        if cfg.scan_layers and n_moe > 0:

            @nnx.split_rngs(splits=n_moe)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return Block(cfg, moe=True, rngs=r)

            self.moe_blocks = make(rngs)
        else:
            self.moe_blocks = nnx.List([Block(cfg, moe=True, rngs=rngs) for _ in range(n_moe)])
        self.final_norm = RMSNorm(d, eps=cfg.rms_eps, param_dtype=pd)
        if not tied:
            self.head = param(None, (d, v), pd, ("embed", "vocab"), rngs=rngs, stddev=d**-0.5)
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)])

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))  # [b, t, d]

    def logits_from(self, h_normed: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        h = h_normed.astype(dt)
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("btd,vd->btv", h, self.embed[...].astype(dt), preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", h, self.head[...].astype(dt), preferred_element_type=jnp.float32)

    def run_blocks(self, x, positions, segment_ids, train: bool = False, ep=None):
        """Main-model blocks: x [b, t, d] -> (x, aux)."""
        cfg = self.cfg
        aux = zero_aux(cfg.n_routed_experts)
        for blk in self.dense_blocks:
            x, a = _call_block(blk, x, positions, segment_ids, cfg.remat, train, ep)
            aux = add_aux(aux, a)
        if cfg.scan_layers and isinstance(self.moe_blocks, Block):

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def body(x, blk):
                return _call_block(blk, x, positions, segment_ids, cfg.remat, train, ep)

            x, stacked = body(x, self.moe_blocks)
            stacked["expert_load"] = stacked["expert_load"].reshape(-1, cfg.n_routed_experts)  # [l, e]
            aux = add_aux(aux, {k: v if k == "expert_load" else v.sum(0) for k, v in stacked.items()})
        else:
            for blk in self.moe_blocks:
                x, a = _call_block(blk, x, positions, segment_ids, cfg.remat, train, ep)
                aux = add_aux(aux, a)
        return x, aux

    def __call__(
        self,
        inputs: jax.Array,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        *,
        train: bool = False,
        ep=None,
    ) -> ModelOutput:
        """inputs [b, t] int token ids; positions, segment_ids [b, t] (default: one unpacked sequence).

        ``train=True``: training-time execution choices (the MoE capacity factor); evaluation and
        generation leave it False (dropless). ``ep``: a ``model.moe_ep.ExpertParallel`` to run the MoE
        layers expert-parallel on its mesh (``train/sharding.expert_parallel``); None = this device.
        """
        b, t = inputs.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x, aux = self.run_blocks(self.embed_tokens(inputs), positions, segment_ids, train, ep)
        h = self.final_norm(x)
        logits = self.logits_from(h)
        mtp_logits = []
        h_prev = h
        for k, module in enumerate(self.mtp, start=1):
            emb = self.embed_tokens(shift_left(inputs, k))  # Emb(t_{i+k})
            h_prev, h_norm, a = module(h_prev, emb, positions, segment_ids, train=train, ep=ep)
            aux = add_aux(aux, a)
            mtp_logits.append(self.logits_from(h_norm))
        return ModelOutput(logits, jnp.stack(mtp_logits) if mtp_logits else None, h, aux)
