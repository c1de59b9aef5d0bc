"""The GRPO loop, top to bottom: model -> state -> task -> loop (sample, score, update, log, save).

``grpo_train(config, workdir)`` is all ``train/rl/main.py`` calls. Each step takes the next
``rl.prompts_per_step`` prompts of the task's train split, samples ``rl.group_size`` completions of
each with the compiled sampler (``model/generation.py``), scores them (``train/rl/rewards.py``),
turns the rewards into group advantages and applies ``rl.updates_per_batch`` optimizer steps on the
GRPO loss (``train/rl/grpo.py``, ``train/rl/step.py``). The frozen reference (when ``rl.beta`` > 0)
is the starting policy: ``rl.init_checkpoint`` (a ``train.main`` run, the supervised cold start)
or the fresh initialisation.

State saved in every checkpoint: policy params, router state, Adam moments, the reference, the
sampler's RNG key, the step; and the task-stream position as the data state. Kill and rerun, and the
later steps are those of the uninterrupted run. The workdir is locked (``train/workdir.py``), the
checkpoints are those of ``train/checkpoint.py``, the metrics those of ``train/metrics.py``.

On a mesh (``config.mesh``, ``train/sharding.py``) the state (policy, Adam moments, reference) is
created, restored and updated with the shardings of the logical-axis rules, as in the language-model
trainer; rollout and held-out rows are split over (data, fsdp, expert) both in the sampler
(``generation.generate_details(rows=...)``) and in the update. One process: the host scores every
completion.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from model import generation
from model.config import ModelConfig
from train import data as data_lib
from train import paths as paths_lib
from train import provenance, sharding
from train import workdir as workdir_lib
from train.checkpoint import Checkpointer
from train.metrics import MetricWriter
from train.optimizer import check_optimizer_config, make_optimizer, make_schedule
from train.rl import grpo, rewards, tasks
from train.rl.config import check_rl_config
from train.rl.step import make_logprob_fn, make_update_step
from train.state import abstract_state, init_state

_BUCKET = 16  # rollout rows are padded to a multiple of this: few distinct shapes, few compilations


def _init_state(cfg, tx, seed: int, rl_seed: int, beta: float) -> tuple:
    graphdef, s = init_state(cfg, tx, seed)
    state = {k: s[k] for k in ("step", "params", "opt_state", "rest", "skipped")}
    state["rng"] = jax.random.key_data(jax.random.key(rl_seed))
    if beta:
        state["ref"] = _frozen_copy(s["params"], s["rest"])
    return graphdef, state


class _Compiled(NamedTuple):
    graphdef: Any
    abstract: Any  # the state's ShapeDtypeStructs
    state_sh: Any  # its shardings on the mesh
    update: Any
    logprobs: Any


@functools.lru_cache(maxsize=4)
def _compiled(cfg, optimizer_json: str, steps: int, seed: int, rl_seed: int, mesh, temperature, beta, **loss):
    """The state's structure and shardings and the jitted update and log-prob functions, reused by a
    later run of the same settings in this process (a resume, a test): their compilation is most of
    a short run's time. ``loss``: epsilon, epsilon_high, aggregation."""
    tx = make_optimizer(ml_collections.ConfigDict(json.loads(optimizer_json)), steps)
    box = {}
    abstract = jax.eval_shape(lambda: box.setdefault("g", _init_state(cfg, tx, seed, rl_seed, beta))[1])
    graphdef = box["g"][0]
    state_sh = sharding.tree_shardings(abstract, mesh)
    update = make_update_step(graphdef, tx, temperature=temperature, beta=beta, mesh=mesh, state_sh=state_sh, **loss)
    return _Compiled(graphdef, abstract, state_sh, update, make_logprob_fn(graphdef, temperature, mesh, state_sh))


def _frozen_copy(params, rest) -> dict:
    """The reference: its own buffers (the update step donates the policy's)."""
    return jax.tree.map(lambda x: x.copy(), {"params": params, "rest": rest})


def _load_policy(path: str, cfg, tx, seed: int, mesh) -> tuple:
    """(params, rest) of a ``train.main`` checkpoint of the same model, placed on ``mesh`` (its
    optimizer state is dropped)."""
    _, abstract = abstract_state(cfg, tx, seed)
    ckpt = Checkpointer(path, save_every=1, async_save=False, read_only=True)
    try:
        target = sharding.with_shardings(abstract, sharding.tree_shardings(abstract, mesh))
        got = ckpt.restore(target, expected_model=cfg.identity())
    finally:
        ckpt.close()
    if got is None:
        raise FileNotFoundError(f"rl.init_checkpoint={path!r}: no checkpoint found there")
    return got[1]["params"], got[1]["rest"]


def _rollout_batch(prompts, completions, eos: int, mask_truncated: bool) -> dict:
    """Host arrays: tokens [b, L], mask [b, L-1] over completion targets, truncated [b] bool."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    width = -(-width // _BUCKET) * _BUCKET
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width - 1), np.float32)
    truncated = np.array([not c or c[-1] != eos for c in completions])
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, : len(p) + len(c)] = list(p) + list(c)
        if not (mask_truncated and truncated[i]):
            mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0  # target j predicts tokens[j + 1]
    return {"tokens": tokens, "mask": mask, "truncated": truncated}


def grpo_train(config, workdir: str, *, on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train ``config`` (``configs/grpo_*.py``) in ``workdir``; returns the summary dict."""
    rl = config.rl
    weights = check_rl_config(rl)
    check_optimizer_config(config.optimizer)
    mesh = sharding.make_mesh(config.mesh)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    split = sharding.batch_parallelism(sizes)
    sharding.check_fits(sizes, cfg, global_batch_size=split)  # the model's widths; the rows below
    if (rl.prompts_per_step * rl.group_size) % split:
        raise sharding.MeshConfigError(
            f"rl.prompts_per_step x rl.group_size = {rl.prompts_per_step * rl.group_size} rollout rows do not "
            f"split over mesh.data x mesh.fsdp x mesh.expert = {split} devices"
        )
    if jax.process_count() > 1:
        raise ValueError(f"GRPO runs in one process (the host scores every completion); got {jax.process_count()}")
    tokenizer = data_lib.load_tokenizer(config.data)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {cfg.vocab_size}")
    task = tasks.make_task(rl)
    workdir = paths_lib.resolve(workdir)
    with workdir_lib.lock(workdir, process_index=jax.process_index()):
        return _train(config, workdir, mesh, cfg, tokenizer, task, weights, on_step)


def _train(config, workdir, mesh, cfg, tokenizer, task, weights, on_step) -> dict:
    rl, tc = config.rl, config.train
    model_dict = cfg.identity()
    tx = make_optimizer(config.optimizer, tc.steps)
    schedule = make_schedule(config.optimizer, tc.steps)
    loss = dict(epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, aggregation=rl.aggregation)
    compiled = _compiled(
        cfg, config.optimizer.to_json(), tc.steps, tc.seed, rl.seed, mesh, rl.temperature, rl.beta, **loss
    )
    graphdef, state_sh, update, logprobs = compiled.graphdef, compiled.state_sh, compiled.update, compiled.logprobs
    ckpt = Checkpointer(
        workdir / "checkpoints",
        keep=tc.keep_checkpoints,
        save_every=tc.checkpoint_every,
        async_save=tc.async_checkpoint,
    )
    try:
        restored = ckpt.restore(
            sharding.with_shardings(compiled.abstract, state_sh),
            expected_model=model_dict,
            allow_fallback=tc.restore_fallback,
        )
    except BaseException:
        ckpt.close()
        raise
    config_json = json.loads(config.to_json_best_effort())
    start_step = 0 if restored is None else restored[0]
    if start_step >= tc.steps and (done := provenance.read_summary(workdir)) is not None:
        ckpt.close()
        print(f"{workdir} holds a finished run (step {start_step}): nothing to do, nothing changed.", flush=True)
        return done
    changes = {} if restored is None else provenance.config_changes(restored[3].get("config", {}), config_json)
    writer = MetricWriter.for_run(workdir, tc, start_step=start_step, config=config_json)
    provenance.write_run_info(
        workdir, config.to_dict(), start_step=start_step, changes=changes, superseded_lines=writer.superseded
    )
    if restored is not None:
        _, state, data_state, _ = restored
        next_prompt = int(data_state["next_prompt"])
        writer.log(f"Resumed from {ckpt.directory}/{start_step}")
        if changes:
            writer.log(f"Config changed since that checkpoint (run_info.json): {provenance.format_changes(changes)}")
    else:
        state = sharding.create(lambda: _init_state(cfg, tx, tc.seed, rl.seed, rl.beta)[1], state_sh, mesh)
        next_prompt = 0
        if rl.init_checkpoint:
            params, rest = _load_policy(rl.init_checkpoint, cfg, tx, tc.seed, mesh)
            state = {**state, "params": params, "rest": rest, "opt_state": tx.init(params)}
            if "ref" in state:
                state["ref"] = _frozen_copy(params, rest)
            state = jax.device_put(state, state_sh)
            writer.log(f"Policy and reference initialised from {rl.init_checkpoint}")
    eos, g, p = tokenizer.eos_id, rl.group_size, rl.prompts_per_step
    encode = lambda text: [tokenizer.bos_id] + tokenizer.encode(text).tolist()
    decode = lambda ids: tokenizer.decode([t for t in ids if t != eos])
    heldout = [task.example("heldout", i) for i in range(rl.eval_prompts)]
    rows = sharding.batch_sharding(mesh)
    split = sharding.batch_parallelism(dict(zip(mesh.axis_names, mesh.axis_sizes)))

    def policy():
        return nnx.merge(graphdef, state["params"], state["rest"])

    def evaluate(step: int) -> float:
        prompts = [encode(e.prompt) for e in heldout]
        prompts += [prompts[i % len(prompts)] for i in range(-len(prompts) % split)]  # split over the mesh
        res = generation.generate_details(
            policy(), prompts, max_new_tokens=rl.max_new_tokens, stop_tokens=[eos], rows=rows
        )
        acc = float(np.mean([rewards.correct(decode(c), e) for c, e in zip(res.tokens, heldout)]))
        writer.write(step, {"heldout_accuracy": acc})
        writer.log(f"step {step}: held-out greedy accuracy {acc:.3f} ({len(heldout)} prompts)")
        return acc

    def save(step: int):
        writer.flush()
        meta = {"model": model_dict, "config": config_json}
        ckpt.save(step, state, data_state={"next_prompt": next_prompt}, meta=meta, force=True)

    stop = {"sig": None}

    def on_signal(sig, frame):
        if sig == signal.SIGINT and stop["sig"] is not None:
            raise KeyboardInterrupt
        stop["sig"] = sig

    prev_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    step, first_acc, last_acc, preempted = start_step, None, None, False
    try:
        if start_step == 0:
            first_acc = evaluate(0)
        while step < tc.steps:
            t0 = time.perf_counter()
            # ---- rollouts: G samples of each prompt, prompt-major ----
            examples = [task.example("train", next_prompt + j) for j in range(p)]
            prompts = [encode(e.prompt) for e in examples for _ in range(g)]
            key, sub = jax.random.split(jax.random.wrap_key_data(state["rng"]))
            seed = int(jax.random.randint(sub, (), 0, np.iinfo(np.int32).max))
            res = generation.generate_details(
                policy(),
                prompts,
                max_new_tokens=rl.max_new_tokens,
                temperature=rl.temperature,
                top_k=rl.top_k,
                top_p=rl.top_p,
                stop_tokens=[eos],
                seed=seed,
                rows=rows,
            )
            t_sample = time.perf_counter() - t0
            # ---- rewards and advantages (a raising reward stops here: nothing applied or saved) ----
            group_examples = [e for e in examples for _ in range(g)]
            texts = [decode(c) for c in res.tokens]
            total, per_fn, unparsed = rewards.score(texts, group_examples, weights, step + 1)
            correct = np.asarray([rewards.correct(t, e) for t, e in zip(texts, group_examples)])
            adv = np.asarray(grpo.group_advantages(total, g, rl.scale_rewards))
            host = _rollout_batch(prompts, res.tokens, eos, rl.mask_truncated)
            batch = {"tokens": host["tokens"], "mask": host["mask"], "advantages": adv}
            if rl.updates_per_batch > 1:
                batch["old_logp"] = logprobs(state["params"], state["rest"], batch["tokens"])
            if "ref" in state:
                batch["ref_logp"] = logprobs(state["ref"]["params"], state["ref"]["rest"], batch["tokens"])
            # ---- mu policy updates on the batch ----
            t1 = time.perf_counter()
            for k in range(rl.updates_per_batch):
                state, m = update(state, batch)
                if k == 0:
                    metrics = jax.device_get(m)  # the first update sees rho = 1: KL, entropy of pi_old
            state = {**state, "step": state["step"] + 1, "rng": jax.random.key_data(key)}
            next_prompt += p
            step += 1
            lengths = np.array([len(c) for c in res.tokens])
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics.update(
                reward_mean=float(total.mean()),
                reward_std=float(total.std()),
                accuracy=float(correct.mean()),
                unparsed_fraction=unparsed / len(texts),
                zero_variance_groups=float(grpo.zero_variance_fraction(total, g)),
                completion_length_mean=float(lengths.mean()),
                completion_length_max=int(lengths.max()),
                truncated_fraction=float(host["truncated"].mean()),
                lr=float(schedule(step - 1)),
                sample_seconds=t_sample,
                update_seconds=time.perf_counter() - t1,
                skipped_steps=int(state["skipped"]),
            )
            for name, v in per_fn.items():
                metrics[f"reward/{name}_mean"] = float(v.mean())
                metrics[f"reward/{name}_std"] = float(v.std())
            writer.write(step, metrics)
            ckpt.poll()
            if step % rl.eval_every == 0 or step == tc.steps:
                last_acc = evaluate(step)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save(step)
            if on_step is not None:
                on_step(step)
            if stop["sig"] is not None:
                writer.log(f"{signal.Signals(stop['sig']).name} at step {step}: saving a checkpoint and exiting.")
                save(step)
                preempted = True
                break
        if last_acc is None:
            last_acc = evaluate(step)
    finally:
        for s, h in prev_handlers.items():
            signal.signal(s, h)
        try:
            ckpt.close()
        finally:
            writer.close()
    summary = {
        "steps": step,
        "preempted": preempted,
        "heldout_accuracy_start": first_acc,
        "heldout_accuracy_final": last_acc,
        "skipped_steps": int(state["skipped"]),
    }
    provenance.write_summary(workdir, summary)
    return summary
