"""qwen_moe_tiny: Qwen3-MoE's structure at moe_tiny's size, on moe_tiny's data and schedule.

  python -m train.main --config=configs/qwen_moe_tiny.py

Grouped-query attention (4 query heads on 2 KV heads, head dim 32, per-head q/k RMSNorm as Qwen3),
4 MoE blocks of 16 experts (softmax router, top-4, normalised gates, no shared expert, no
selection bias), untied head, no MTP, byte-level tokenizer, d_model 128 (1.85M parameters, 0.67M
activated). Measured on a 2-core CPU (jax 0.10.2): see the README's Qwen-MoE section for the final
eval bits per byte.
"""

from configs import moe_tiny


def get_config():
    c = moe_tiny.get_config("qwen_moe_tiny")  # moe_tiny's data, schedule and optimizer
    # Without the aux-loss-free bias, the balance loss is the only balancing force (Qwen3 trains with
    # an auxiliary loss of weight 1e-3, router_aux_loss_coef; ours is the sequence-wise one, eq. 17-20).
    c.train.balance_loss_alpha = 1e-3
    c.train.bias_update_rate = 0.0  # no selection bias to update (use_aux_free_bias=False)
    return c
