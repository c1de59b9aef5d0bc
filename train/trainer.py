"""The training loop, top to bottom: mesh -> model -> state -> data -> loop.

``train_and_evaluate(config, workdir)`` is all ``train/main.py`` calls. It resumes from the newest
checkpoint in ``workdir`` if there is one (refusing one written for a different model), trains
``config.train.steps`` optimizer steps, evaluates and checkpoints periodically and at the end,
and writes ``summary.json``. SIGTERM (preemption) and SIGINT (Ctrl-C; a second one stops at once)
save a checkpoint and return cleanly. The workdir is locked for the run (``train/workdir.py``): a
second trainer on it fails at once; checkpoint safety is ``train/checkpoint.py`` and
``train/nonfinite.py``. A resume announces and records config fields that differ from the
checkpoint's, and takes the interrupted run's metric lines after the checkpoint out of
``metrics.jsonl`` (``train/metrics.py``); rerunning a finished run changes nothing. ``workdir`` may
be local or a URL (``gs://bucket/run``, ``train/paths.py``).

Parallelism (``train/sharding.py``): the mesh ``config.mesh`` spans every device of every process;
params and Adam moments are created, restored and updated with the shardings of the logical-axis
table, each process feeds its own rows and the global batch is assembled from them. With the
default 1-device mesh this is the plain single-device run.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Callable, Optional

import jax
from jax.experimental import multihost_utils

from model.config import ModelConfig
from train import data as data_lib
from train import memory, provenance, sharding, tracker
from train import paths as paths_lib
from train import workdir as workdir_lib
from train.checkpoint import Checkpointer
from train.flops import model_flops_per_token
from train.metrics import MetricWriter
from train.nonfinite import NonFiniteError, NonFiniteGuard
from train.optimizer import check_optimizer_config, make_optimizer, make_schedule
from train.peak import peak_flops
from train.profiler import StepProfiler
from train.profiler import parse_steps as parse_profile_steps
from train.state import abstract_state, init_state
from train.step import eval_metrics, make_eval_step, sharded_train_step

__all__ = ["NonFiniteError", "train_and_evaluate"]


def _check_batch_config(config) -> None:
    t = config.train
    if t.microbatches < 1:
        raise ValueError(f"train.microbatches must be >= 1, got {t.microbatches}")
    if t.global_batch_size % (t.microbatches * jax.process_count()) != 0:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} must be divisible by "
            f"train.microbatches={t.microbatches} x processes={jax.process_count()}"
        )
    if t.steps <= 0:
        raise ValueError(f"train.steps must be > 0, got {t.steps}")
    for name in (
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "log_every",
        "log_expert_load_every",
        "eval_batches",
    ):
        if t[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
    tracker.parse(t.tracker)
    parse_profile_steps(t.profile_steps)
    check_optimizer_config(config.optimizer)


def _load_init_checkpoint(path: str, state: dict, model_dict: dict) -> dict:
    """Replace ``state['params']`` and ``state['rest']`` by those of a weights-only checkpoint
    (``tools.convert_hf import`` writes one: state = {"params", "rest"}, meta = {"model"})."""
    ckpt = Checkpointer(path, save_every=1, async_save=False, read_only=True)
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
    _check_batch_config(config)
    workdir = paths_lib.resolve(workdir)  # absolute (orbax needs it); a gs:// URL stays a URL
    # ---- mesh: every device of every process; refuse a misfit before compiling anything ----
    mesh = sharding.make_mesh(config.mesh)
    # ---- model and tokenizer: a bad config or tokenizer fails here, before the workdir exists ----
    cfg, tokenizer = _check_model_and_tokenizer(config, mesh)
    with workdir_lib.lock(workdir, process_index=jax.process_index()):
        return _train_and_evaluate(config, workdir, mesh, cfg, tokenizer, on_step)


def _check_model_and_tokenizer(config, mesh):
    tc = config.train
    mesh_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    cfg = ModelConfig.from_dict(config.model.to_dict())
    if cfg.param_dtype != "float32":  # master weights (DeepSeek-V3 report Sec. 3.3)
        raise ValueError(
            f"model.param_dtype={cfg.param_dtype!r}: training keeps float32 parameters; "
            f"set model.dtype for {cfg.param_dtype} compute (optimizer.moment_dtype for the Adam moments)"
        )
    sharding.check_fits(mesh_sizes, cfg, global_batch_size=tc.global_batch_size, microbatches=tc.microbatches)
    tokenizer = data_lib.load_tokenizer(config.data)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {cfg.vocab_size}: "
            f"set --config.model.vocab_size to at least {tokenizer.vocab_size}"
        )
    if config.data.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    return cfg, tokenizer


def _train_and_evaluate(config, workdir, mesh, cfg, tokenizer, on_step) -> dict:
    tc = config.train
    mesh_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    model_dict = cfg.identity()

    # ---- checkpoints: refuse a different model before doing any work ----
    ckpt = Checkpointer(
        workdir / "checkpoints",
        keep=tc.keep_checkpoints,
        save_every=tc.checkpoint_every,
        async_save=tc.async_checkpoint,
    )
    tx = make_optimizer(config.optimizer, tc.steps)
    schedule = make_schedule(config.optimizer, tc.steps)
    graphdef, abstract = abstract_state(cfg, tx, tc.seed)
    state_sh = sharding.tree_shardings(abstract, mesh)  # restores onto this mesh, whatever wrote it
    try:
        restored = ckpt.restore(
            sharding.with_shardings(abstract, state_sh),
            expected_model=model_dict,
            allow_fallback=tc.restore_fallback,
            fresh_start_ok=tc.start_from_scratch,
        )
    except BaseException:
        ckpt.close()
        raise
    start_step = 0 if restored is None else restored[0]
    config_json = json.loads(config.to_json_best_effort())
    if start_step >= tc.steps and (done := provenance.read_summary(workdir)) is not None:
        ckpt.close()
        if jax.process_index() == 0:
            print(
                f"{workdir} holds a finished run (checkpoint step {start_step}, train.steps={tc.steps}): "
                f"nothing to do, nothing changed. Raise train.steps to train further.",
                flush=True,
            )
        return done
    changes = {} if restored is None else provenance.config_changes(restored[3].get("config", {}), config_json)

    writer = MetricWriter.for_run(workdir, tc, start_step=start_step, config=config_json)
    provenance.write_run_info(
        workdir, config.to_dict(), start_step=start_step, changes=changes, superseded_lines=writer.superseded
    )
    if writer.superseded:
        writer.log(
            f"Moved {writer.superseded} metric lines after step {start_step} (written by the interrupted "
            f"run) to metrics.superseded.jsonl"
        )

    # ---- state ----
    if restored is not None:
        start_step, state, data_state, _ = restored
        writer.log(f"Resumed from {ckpt.directory}/{start_step}")
        if changes:
            writer.log(
                f"Config changed since that checkpoint (recorded in run_info.json): "
                f"{provenance.format_changes(changes)}"
            )
    else:
        start_step, data_state = 0, None
        state = sharding.create(lambda: init_state(cfg, tx, tc.seed)[1], state_sh, mesh)
        if tc.init_checkpoint:
            state = _load_init_checkpoint(tc.init_checkpoint, state, model_dict)
            writer.log(f"Initialised parameters from {tc.init_checkpoint}")
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    writer.log(
        f"Model: {n_params / 1e6:.2f}M parameters; mesh {mesh_sizes} over {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)"
    )

    # ---- data ----
    pi, pc = jax.process_index(), jax.process_count()
    shards = dict(process_index=pi, process_count=pc, allgather=multihost_utils.process_allgather if pc > 1 else None)
    train_iter = data_lib.make_train_iterator(config.data, global_batch_size=tc.global_batch_size, **shards)
    if data_state is not None:
        train_iter.set_state(data_state)
    eval_batches = data_lib.make_eval_batches(
        config.data, batch_size=tc.global_batch_size, num_batches=tc.eval_batches, **shards
    )
    eval_batches = [sharding.global_batch(b, mesh) for b in eval_batches]

    # ---- compiled steps: state keeps its shardings, batches are split over the batch axes ----
    batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    train_step = sharded_train_step(graphdef, tx, tc, mesh, state_sh)
    eval_step = sharding.MeshJit(
        make_eval_step(graphdef, sharding.expert_parallel(mesh)),
        mesh,
        out_shardings=replicated,
        in_shardings=(state_sh["params"], state_sh["rest"], batch_sh),
    )
    flops_per_token = model_flops_per_token(cfg, config.data.seq_len)
    peak, peak_src = peak_flops(
        tc.peak_flops, device_kind=jax.devices()[0].device_kind, dtype=cfg.dtype, local_devices=len(mesh.local_devices)
    )
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

    guard = NonFiniteGuard(ckpt, tc.max_nonfinite_steps, start_step if restored is not None else None)

    def save(step: int, force: bool = False):
        if not guard.may_save():  # never checkpoint a state the last step found non-finite
            writer.log(f"step {step}: not saving a checkpoint after a non-finite step")
            return
        writer.flush()  # every metric line up to a checkpoint is stored before it
        meta = {"model": model_dict, "config": config_json}
        if ckpt.save(step, state, data_state=train_iter.get_state(), meta=meta, force=force):
            guard.saved(step)

    # ---- SIGTERM / SIGINT: finish the current step, save, exit cleanly ----
    stop = {"sig": None}

    def on_signal(sig, frame):
        if sig == signal.SIGINT and stop["sig"] is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last committed checkpoint stays)
        stop["sig"] = sig

    prev_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    step, last_eval = start_step, None
    tokens_per_step = tc.global_batch_size * config.data.seq_len
    timed_tokens, timed_secs, preempted = 0, 0.0, False
    profiler = StepProfiler(tc.profile_steps, workdir)
    try:
        while step < tc.steps:
            batch = next(train_iter)
            if step == start_step:
                data_lib.check_token_ids(batch, cfg.vocab_size)
            batch = sharding.global_batch(batch, mesh)
            if step == start_step:  # compile both steps, then free the compiler's heap before their buffers
                memory.compile_ahead(train_step, state, batch)
                memory.compile_ahead(eval_step, state["params"], state["rest"], eval_batches[0])
            profiler.before_step(step)
            t0 = time.perf_counter()
            state, metrics = train_step(state, batch)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            step += 1
            profiler.after_step(step, state)
            if step > start_step + 1:  # the first step compiles
                timed_tokens += tokens_per_step
                timed_secs += dt
            finite = bool(metrics.pop("finite"))
            ckpt.poll()  # a failed async save stops the run now
            if step % tc.log_every == 0 or step == tc.steps:
                tps = tokens_per_step / dt
                metrics.update(
                    lr=float(schedule(step - 1)),
                    tokens_per_sec=tps,
                    mfu=tps * flops_per_token / peak_total,
                    skipped_steps=int(state["skipped"]),
                )
                writer.write(step, metrics)
            note = guard.after_step(step, finite)  # raises NonFiniteError after too many in a row
            if note:
                writer.log(
                    f"step {step}: non-finite loss/gradient (loss={metrics['loss']}, "
                    f"grad_norm={metrics['grad_norm']}); {note}"
                )
            if on_step is not None:
                on_step(step)
            if step % tc.eval_every == 0 or step == tc.steps:
                last_eval = evaluate(step)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save(step, force=True)
            if stop["sig"] is not None:
                writer.log(f"{signal.Signals(stop['sig']).name} at step {step}: saving a checkpoint and exiting.")
                save(step, force=True)
                preempted = True
                break
        if last_eval is None:  # preempted, or resumed a finished run: evaluate what we have
            last_eval = evaluate(step)
    finally:
        profiler.stop()
        for s, h in prev_handlers.items():
            signal.signal(s, h)
        try:
            ckpt.close()  # waits for the last save; raises CheckpointWriteError if it failed
        finally:
            writer.close()

    summary = {
        "steps": step,
        "preempted": preempted,
        "final_eval_loss": last_eval["eval_loss"],
        "final_eval_perplexity": last_eval["eval_perplexity"],
        "final_eval_bits_per_byte": last_eval["eval_bits_per_byte"],
        "unigram_bits_per_byte": data_lib.unigram_bits_per_byte(config.data),
        "tokens_per_second": timed_tokens / timed_secs if timed_secs else float("nan"),
        "mfu": (timed_tokens / timed_secs * flops_per_token / peak_total) if timed_secs else float("nan"),
        "peak_flops_per_device": peak,
        "peak_source": peak_src,
        "skipped_steps": int(state["skipped"]),
        "params": int(n_params),
    }
    provenance.write_summary(workdir, summary)
    return summary
