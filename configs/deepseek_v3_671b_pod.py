"""DeepSeek-V3 671B on a 2048-chip pod (e.g. a TPU v5p-4096 slice: 2048 chips, 95 GiB HBM each):
the recipe of ``deepseek_v3_671b.py`` plus the mesh.

  python -m tools.plan --config=configs/deepseek_v3_671b_pod.py      # on a laptop, ~1-2 min
  # on the pod (every worker at once; see README "Parallel training"):
  python -m train.main --config=configs/deepseek_v3_671b_pod.py --workdir=gs://BUCKET/v3 --distributed

Mesh 1 x 16 x 64 x 2 (data x fsdp x expert x tensor = 2048):
  expert=64   4 of the 256 routed experts per chip (DeepSeek trained V3 with 64-way EP too, report
              Sec. 3.2); every routed-expert weight lives on exactly one (expert, fsdp, tensor) shard.
  fsdp=16     shards the ~17B non-expert params, all Adam moments and the expert weights' d_model
              dim; with 64-way EP on top, each chip holds ~1/2048 of everything (tools.plan).
  tensor=2    splits the 128 MLA heads (and FFN widths) in two; mainly so that the batch axes
              (data x fsdp x expert = 1024) divide the 15360-sequence batch: 15 sequences per chip.
  data=1      no replicated copies are needed at this size; raise it (with fsdp) across slices.
Microbatches 15: one 4096-token sequence per chip per microbatch (remat "full" keeps one block's
activations). Capacity factor 2.0: the portable all-to-all sends fixed buffers, sized 2x the mean
rows per destination; a dropless run's worst-case buffers (64 x 16384 rows of 7168) do not fit.
Drops are reported as ``dropped_tokens``.
"""

from configs import deepseek_v3_671b


def get_config():
    c = deepseek_v3_671b.get_config()
    c.mesh.data = 1
    c.mesh.fsdp = 16
    c.mesh.expert = 64
    c.mesh.tensor = 2
    c.train.microbatches = 15
    # 14.8T pre-training tokens (report Sec. 4.2) / (15360 x 4096 tokens per step).
    c.train.steps = 235_000
    c.model.capacity_factor = 2.0
    return c
