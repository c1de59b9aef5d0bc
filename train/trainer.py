"""The training loop, top to bottom: mesh -> model -> state -> data -> loop.

``train_and_evaluate(config, workdir)`` is all ``train/main.py`` calls. It resumes from the newest
checkpoint in ``workdir`` if there is one (refusing one written for a different model), trains
``config.train.steps`` optimizer steps, evaluates and checkpoints periodically and at the end,
and writes ``summary.json``. SIGTERM (preemption) saves a checkpoint and returns cleanly.

Parallelism (``train/sharding.py``): the mesh ``config.mesh`` spans every device of every process;
params and Adam moments are created, restored and updated with the shardings of the logical-axis
table, each process feeds its own rows and the global batch is assembled from them. With the
default 1-device mesh this is the plain single-device run.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import jax

from model.config import ModelConfig
from train import data as data_lib
from train import sharding
from train.checkpoint import Checkpointer
from train.flops import model_flops_per_token, peak_flops
from train.metrics import MetricWriter, write_run_info, write_summary
from train.optimizer import make_optimizer, make_schedule
from train.state import abstract_state, init_state
from train.step import eval_metrics, make_eval_step, sharded_train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def model_config(config) -> ModelConfig:
    """``config.model`` plus the kernel backend ``config.kernels.impl`` (auto | scan | ragged_dot | pallas), with
    ``model.dtype = "auto"`` resolved for the current backend."""
    fields = config.model.to_dict()
    if "kernels" in config:
        fields["kernels_impl"] = config.kernels.impl
    if fields.get("dtype") == "auto":  # bf16 compute on accelerators, f32 on CPU
        fields["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return ModelConfig.from_dict(fields)


def _check_batch_config(config) -> None:
    t = config.train
    if t.microbatches < 1:
        raise ValueError(f"train.microbatches must be >= 1, got {t.microbatches}")
    if t.global_batch_size % (t.microbatches * jax.process_count()) != 0:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                         f"train.microbatches={t.microbatches} x processes={jax.process_count()}")
    if t.steps <= 0:
        raise ValueError(f"train.steps must be > 0, got {t.steps}")


def _load_init_checkpoint(path: str, state: dict, model_dict: dict) -> dict:
    """Replace ``state['params']`` and ``state['rest']`` by those of a weights-only checkpoint
    (``tools.convert_hf import`` writes one: state = {"params", "rest"}, meta = {"model"})."""
    ckpt = Checkpointer(path, save_every=1, async_save=False)
    try:
        got = ckpt.restore({"params": state["params"], "rest": state["rest"]}, expected_model=model_dict)
    finally:
        ckpt.close()
    if got is None:
        raise FileNotFoundError(f"train.init_checkpoint={path!r}: no checkpoint found there")
    _, weights, _, _ = got
    return {**state, "params": weights["params"], "rest": weights["rest"]}


def train_and_evaluate(config, workdir: str, *, on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train ``config`` in ``workdir``; returns the summary dict. ``on_step(step)`` is a test hook."""
    workdir = Path(workdir).absolute()  # orbax needs absolute paths; the default workdir is relative
    workdir.mkdir(parents=True, exist_ok=True)
    tc = config.train
    _check_batch_config(config)

    # ---- mesh: every device of every process; refuse a misfit before compiling anything ----
    mesh = sharding.make_mesh(config.mesh)
    mesh_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

    # ---- model and tokenizer ----
    cfg = model_config(config)
    sharding.check_fits(mesh_sizes, cfg, global_batch_size=tc.global_batch_size, microbatches=tc.microbatches)
    tokenizer = data_lib.load_tokenizer(config.data)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {cfg.vocab_size}: "
                         f"set --config.model.vocab_size to at least {tokenizer.vocab_size}")
    if config.data.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    model_dict = cfg.identity()

    # ---- checkpoints: refuse a different model before doing any work ----
    ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints, save_every=tc.checkpoint_every,
                        async_save=tc.async_checkpoint)
    tx = make_optimizer(config.optimizer, tc.steps)
    schedule = make_schedule(config.optimizer, tc.steps)
    graphdef, abstract = abstract_state(cfg, tx, tc.seed)
    state_sh = sharding.tree_shardings(abstract, mesh)  # restores onto this mesh, whatever wrote it
    restored = ckpt.restore(sharding.with_shardings(abstract, state_sh), expected_model=model_dict,
                            allow_fallback=tc.restore_fallback)

    writer = MetricWriter(workdir, total_steps=tc.steps, enable_tensorboard=tc.tensorboard, console=tc.progress)
    write_run_info(workdir, config.to_dict())

    # ---- state ----
    if restored is not None:
        start_step, state, data_state, _ = restored
        writer.log(f"Resumed from {ckpt.directory}/{start_step}")
    else:
        start_step, data_state = 0, None
        state = sharding.create(lambda: init_state(cfg, tx, tc.seed)[1], state_sh, mesh)
        if tc.init_checkpoint:
            state = _load_init_checkpoint(tc.init_checkpoint, state, model_dict)
            writer.log(f"Initialised parameters from {tc.init_checkpoint}")
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    writer.log(f"Model: {n_params / 1e6:.2f}M parameters; mesh {mesh_sizes} over {jax.device_count()} "
               f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)")

    # ---- data ----
    pi, pc = jax.process_index(), jax.process_count()
    train_iter = data_lib.make_train_iterator(config.data, global_batch_size=tc.global_batch_size,
                                              process_index=pi, process_count=pc)
    if data_state is not None:
        train_iter.set_state(data_state)
    eval_batches = data_lib.make_eval_batches(config.data, batch_size=tc.global_batch_size,
                                              num_batches=tc.eval_batches, process_index=pi, process_count=pc)
    eval_batches = [sharding.global_batch(b, mesh) for b in eval_batches]

    # ---- compiled steps: state keeps its shardings, batches are split over the batch axes ----
    batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    train_step = sharded_train_step(graphdef, tx, tc, mesh, state_sh)
    eval_step = sharding.MeshJit(make_eval_step(graphdef, sharding.expert_parallel(mesh)), mesh, out_shardings=replicated,
                                 in_shardings=(state_sh["params"], state_sh["rest"], batch_sh))
    flops_per_token = model_flops_per_token(cfg, config.data.seq_len)
    peak, peak_src = peak_flops(tc.peak_flops)
    peak_total = peak * mesh.size  # the devices this run computes on (1 for the default mesh)
    writer.log(f"MFU denominator: {peak_total / 1e12:.3f} TFLOP/s ({peak_src})")

    def evaluate(step: int) -> dict:
        sums = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for b in eval_batches:
            out = jax.device_get(eval_step(state["params"], state["rest"], b))
            for k in sums:
                sums[k] += float(out[k])
        m = eval_metrics(sums)
        writer.write(step, m)
        writer.log(f"step {step}: eval loss {m['eval_loss']:.4f}, bits/byte {m['eval_bits_per_byte']:.4f}")
        return m

    def save(step: int, force: bool = False):
        meta = {"model": model_dict, "config": json.loads(config.to_json_best_effort())}
        ckpt.save(step, state, data_state=train_iter.get_state(), meta=meta, force=force)

    # ---- SIGTERM: finish the current step, save, exit cleanly ----
    stop = {"sig": None}
    prev_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda s, f: stop.__setitem__("sig", s))

    step, last_eval, bad_in_a_row = start_step, None, 0
    tokens_per_step = tc.global_batch_size * config.data.seq_len
    timed_tokens, timed_secs, preempted = 0, 0.0, False
    try:
        while step < tc.steps:
            batch = next(train_iter)
            if step == start_step:
                data_lib.check_token_ids(batch, cfg.vocab_size)
            batch = sharding.global_batch(batch, mesh)
            t0 = time.perf_counter()
            state, metrics = train_step(state, batch)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            step += 1
            if step > start_step + 1:  # the first step compiles
                timed_tokens += tokens_per_step
                timed_secs += dt
            finite = bool(metrics.pop("finite"))
            if step % tc.log_every == 0 or step == tc.steps:
                tps = tokens_per_step / dt
                metrics.update(lr=float(schedule(step - 1)), tokens_per_sec=tps,
                               mfu=tps * flops_per_token / peak_total, skipped_steps=int(state["skipped"]))
                writer.write(step, metrics)
            if not finite:
                bad_in_a_row += 1
                writer.log(f"step {step}: non-finite loss/gradient (loss={metrics['loss']}, "
                           f"grad_norm={metrics['grad_norm']}); update skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= tc.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{bad_in_a_row} consecutive non-finite steps (last: {step}); stopping. The last good "
                        f"checkpoint in {ckpt.directory} (step {ckpt.latest_step()}) is intact; lower "
                        f"optimizer.lr or check the data.")
            else:
                bad_in_a_row = 0
            if on_step is not None:
                on_step(step)
            if step % tc.eval_every == 0 or step == tc.steps:
                last_eval = evaluate(step)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save(step, force=True)
            if stop["sig"] is not None:
                writer.log(f"SIGTERM at step {step}: saving a checkpoint and exiting.")
                save(step, force=True)
                preempted = True
                break
        if last_eval is None:  # preempted, or resumed a finished run: evaluate what we have
            last_eval = evaluate(step)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        signal.signal(signal.SIGTERM, prev_handler)

    summary = {
        "steps": step,
        "preempted": preempted,
        "final_eval_loss": last_eval["eval_loss"],
        "final_eval_perplexity": last_eval["eval_perplexity"],
        "final_eval_bits_per_byte": last_eval["eval_bits_per_byte"],
        "unigram_bits_per_byte": data_lib.unigram_bits_per_byte(config.data),
        "tokens_per_second": timed_tokens / timed_secs if timed_secs else float("nan"),
        "mfu": (timed_tokens / timed_secs * flops_per_token / peak_total) if timed_secs else float("nan"),
        "skipped_steps": int(state["skipped"]),
        "params": int(n_params),
    }
    write_summary(workdir, summary)
    return summary
