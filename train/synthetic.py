"""Random token batches in the data pipeline's layout, for benchmarks and parallelism tests."""

import numpy as np


def synthetic_batches(global_batch: int, seq_len: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` batches of random byte tokens; the last 5 positions of every row are padding (segment 0)."""
    rng = np.random.default_rng(seed)
    b, t = global_batch, seq_len
    seg = np.ones((b, t), np.int32)
    seg[:, t - 5 :] = 0
    out = []
    for _ in range(n):
        toks = rng.integers(3, 259, (b, t + 1)).astype(np.int32)
        out.append(
            dict(
                inputs=toks[:, :-1] * seg,
                targets=toks[:, 1:] * seg,
                segment_ids=seg,
                positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                loss_mask=seg.astype(np.float32),
            )
        )
    return out
