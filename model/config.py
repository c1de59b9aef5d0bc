"""Model hyperparameters: one frozen, validated dataclass.

Every layer receives a ``ModelConfig`` (never the whole experiment config). Field names follow
the DeepSeek-V3 report's notation where it has one; the matching Hugging Face ``config.json``
name is given in the comment when it differs, so conversion (``model/hf.py``) is a plain rename.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from model.attention import IMPLS as ATTENTION_IMPLS
from model.linear import RECIPES

_SCORE_FNS = ("sigmoid", "softmax")
_GROUP_SCORES = ("top2_sum", "max")
_KERNEL_IMPLS = ("auto", "scan", "ragged_dot", "pallas")  # kernels_pallas/backend.py
# Each policy is implemented in ``model/transformer.py`` and tested against "none" (gradients).
_REMAT = ("none", "full", "dots", "dots_no_batch")
_DTYPES = ("float32", "bfloat16", "float16")
# Fields that change how the model runs, not what it is (``ModelConfig.identity`` leaves them out).
EXECUTION_FIELDS = (
    "kernels_impl",
    "remat",
    "moe_block_rows",
    "dtype",
    "max_seq_len",
    "attention_impl",
    "capacity_factor",
    "gemm_recipe",
)


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (DeepSeek-V3 report Sec. 4.3; Peng et al. 2023, eq. 17-20).

    HF ``rope_scaling = {"type": "yarn", ...}`` with the same field names.
    """

    factor: float = 40.0  # s: target context / original context
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0  # beta: rotations above which a dim is kept unscaled (high frequency)
    beta_slow: float = 1.0  # alpha: rotations below which a dim is fully interpolated
    mscale: float = 1.0  # sqrt(t) = 0.1 * mscale * ln(s) + 1 on the attention logits...
    mscale_all_dim: float = 1.0  # ...divided by the same with mscale_all_dim (DeepSeek's convention)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3-style decoder. Defaults are ``moe_tiny``; see ``model/presets.py`` for sizes."""

    # --- sizes ---
    vocab_size: int = 264  # V; byte tokenizer needs >= 259 (256 bytes + pad/bos/eos)
    d_model: int = 128  # d (hidden_size)
    n_layers: int = 4  # main-model transformer blocks (num_hidden_layers)
    first_k_dense: int = 1  # the first k blocks use a dense FFN (first_k_dense_replace)
    dense_ffn_dim: int = 384  # f of the dense SwiGLU (intermediate_size)
    rms_eps: float = 1e-6
    max_seq_len: int = 4096  # longest position the RoPE tables cover (max_position_embeddings)

    # --- MLA (DeepSeek-V2 report Sec. 2.1; V3 report Sec. 2.1.1) ---
    n_heads: int = 4  # h (num_attention_heads)
    q_lora_rank: Optional[int] = 64  # d_c' query latent; None = no query compression (V2-Lite)
    kv_lora_rank: int = 32  # d_c KV latent
    qk_nope_head_dim: int = 16  # d_h of the content part of q/k
    qk_rope_head_dim: int = 8  # d_h^R of the decoupled RoPE part (key shared by all heads)
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # checkpoint stores rope dims pair-interleaved (DeepSeek's layout)
    yarn: Optional[YarnConfig] = None  # None = plain RoPE

    # --- DeepSeekMoE (V3 report Sec. 2.1.2) ---
    n_routed_experts: int = 16  # N_r
    n_shared_experts: int = 1  # N_s
    n_experts_per_tok: int = 4  # K_r (num_experts_per_tok)
    moe_ffn_dim: int = 64  # f of each expert (moe_intermediate_size)
    score_fn: str = "sigmoid"  # s_{i,t} = sigmoid(u^T e_i) in V3; softmax in V2 (scoring_func)
    n_group: int = 4  # expert groups for group-limited routing (n_group); 1 = plain top-k
    topk_group: int = 2  # groups each token may use (topk_group)
    # how a group is scored: "top2_sum" of its biased scores (V3, HF topk_method "noaux_tc") or its
    # "max" score (V2, HF "group_limited_greedy")
    group_score: str = "top2_sum"
    norm_topk_prob: bool = True  # normalise gates over the chosen k (eq. 13)
    routed_scaling_factor: float = 2.5
    use_aux_free_bias: bool = True  # selection bias b_i (e_score_correction_bias), Sec. 2.1.2
    # training only (``train=True`` calls): None = dropless; else ceil(C * T * K / N_r) rows per expert
    # on each device. Evaluation and generation are always dropless.
    capacity_factor: Optional[float] = None
    moe_block_rows: int = 64  # rows per tile of the grouped expert matmul (XLA path)

    # --- MTP (V3 report Sec. 2.2) ---
    mtp_depth: int = 1  # D sequential MTP modules; 0 disables

    # --- execution ---
    # Storage dtype of the parameters. Training keeps float32 master weights (DeepSeek-V3 report
    # Sec. 3.3; the trainer refuses anything else); bfloat16 is for inference-only loading.
    param_dtype: str = "float32"
    # Compute dtype of matmuls; norms, softmax, router and loss stay f32. "auto" = bfloat16 on
    # GPU/TPU, float32 on CPU, resolved here at construction (``ModelConfig(dtype="auto").dtype``
    # is concrete).
    dtype: str = "float32"
    scan_layers: bool = False  # nnx.scan over the homogeneous MoE blocks
    remat: str = "none"  # rematerialisation policy of each block, one of _REMAT
    kernels_impl: str = "auto"  # grouped matmul + router backend, one of _KERNEL_IMPLS
    attention_impl: str = "auto"  # attention backend, model/attention.py: auto|naive|xla|splash|cudnn
    # Precision recipe of every linear GEMM (model/linear.py RECIPES): "bf16" = the compute dtype;
    # "fp8" = DeepSeek-V3 Sec. 3.3 fine-grained e4m3 in fprop, dgrad and wgrad; "int8" same tiles.
    gemm_recipe: str = "bf16"

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "dense_ffn_dim",
            "n_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "n_experts_per_tok",
            "moe_ffn_dim",
            "n_group",
            "topk_group",
            "moe_block_rows",
            "max_seq_len",
        ):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            f"q_lora_rank must be None or a positive int, got {self.q_lora_rank!r}",
        )
        need(
            0 <= self.first_k_dense <= self.n_layers,
            f"first_k_dense={self.first_k_dense} must be in [0, n_layers={self.n_layers}]",
        )
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        need(
            self.n_experts_per_tok <= self.n_routed_experts,
            f"n_experts_per_tok={self.n_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}",
        )
        need(
            self.n_routed_experts % self.n_group == 0,
            f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}",
        )
        need(self.topk_group <= self.n_group, f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        need(self.group_score in _GROUP_SCORES, f"group_score must be one of {_GROUP_SCORES}, got {self.group_score!r}")
        if self.n_group > 1:
            need(
                per_group >= 2 or self.group_score == "max",
                "group_score='top2_sum' scores a group by its "
                f"top-2 experts: need >= 2 experts per group, got {per_group}",
            )
            need(
                self.topk_group * per_group >= self.n_experts_per_tok,
                f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                f"n_experts_per_tok={self.n_experts_per_tok}",
            )
        need(self.score_fn in _SCORE_FNS, f"score_fn must be one of {_SCORE_FNS}, got {self.score_fn!r}")
        need(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"capacity_factor must be None (dropless) or > 0, got {self.capacity_factor}",
        )
        need(self.mtp_depth >= 0, f"mtp_depth must be >= 0, got {self.mtp_depth}")
        need(self.remat in _REMAT, f"remat must be one of {_REMAT}, got {self.remat!r}")
        need(self.param_dtype in _DTYPES, f"param_dtype must be one of {_DTYPES}, got {self.param_dtype!r}")
        need(self.dtype in _DTYPES + ("auto",), f"dtype must be one of {_DTYPES + ('auto',)}, got {self.dtype!r}")
        if self.dtype == "auto":  # the one place "auto" is resolved: bf16 on GPU/TPU, f32 on CPU
            import jax  # here only: the dataclass is plain Python otherwise

            object.__setattr__(self, "dtype", "float32" if jax.default_backend() == "cpu" else "bfloat16")
        need(
            self.kernels_impl in _KERNEL_IMPLS,
            f"kernels_impl must be one of {_KERNEL_IMPLS}, got {self.kernels_impl!r}",
        )
        need(
            self.attention_impl in ATTENTION_IMPLS,
            f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}",
        )
        need(self.gemm_recipe in RECIPES, f"gemm_recipe must be one of {RECIPES}, got {self.gemm_recipe!r}")
        if isinstance(self.yarn, Mapping):  # allow a plain dict from a config file
            object.__setattr__(self, "yarn", YarnConfig(**self.yarn))

    # --- derived sizes ---
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times YaRN's mscale^2 as DeepSeek's reference code applies it."""
        import math

        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = 0.1 * self.yarn.mscale_all_dim * math.log(self.yarn.factor) + 1.0 if self.yarn.factor > 1 else 1.0
            scale = scale * m * m
        return scale

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping (e.g. ``config.model.to_dict()``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if d.get("yarn") is not None and not isinstance(d["yarn"], YarnConfig):
            d["yarn"] = YarnConfig(**dict(d["yarn"]))
        return cls(**d)

    def identity(self) -> dict:
        """The fields that define the model (what a checkpoint must match); execution-only
        fields (kernel backend, remat, tile size, compute dtype, RoPE table length) may differ."""
        d = dataclasses.asdict(self)
        for k in EXECUTION_FIELDS:
            d.pop(k)
        return d

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
