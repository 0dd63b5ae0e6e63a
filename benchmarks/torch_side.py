"""The PyTorch peers: plain transformers training loops and TRL 1.12's PPOTrainer, on CPU.

Every function takes the same HF config dict and numpy batch as the JAX side and returns plain
floats (seconds, rates) plus details for the JSON.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.timing import Timing, time_calls


def hf_config(shape: dict[str, Any], **overrides: Any):
    """A transformers config for the shape dict (``model_type`` selects the family)."""
    import transformers

    kw = {k: v for k, v in shape.items() if k != "model_type"}
    kw.update(overrides)
    return transformers.AutoConfig.for_model(shape["model_type"], **kw)


def build_model(shape: dict[str, Any], *, head: str = "causal", seed: int = 0):
    """A float32 random-weight model in train mode: ``head`` is "causal" or "scalar" (num_labels=1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if head == "causal":
        model = transformers.AutoModelForCausalLM.from_config(hf_config(shape), attn_implementation="sdpa")
    elif head == "scalar":
        model = transformers.AutoModelForSequenceClassification.from_config(
            hf_config(shape, num_labels=1), attn_implementation="sdpa"
        )
    else:
        raise ValueError(f"head must be 'causal' or 'scalar', got {head!r}")
    return model.float().train()


def sft_step_time(shape: dict[str, Any], batch: dict[str, np.ndarray], *, reps: int, warmup: int = 1) -> dict[str, Any]:
    """A plain PyTorch SFT step: forward, masked token cross-entropy, backward, clip to norm 1, AdamW.

    The same work as our step (whose optimizer clips the global norm to 1 and runs AdamW).

    ``batch``: ``input_ids``/``targets``/``loss_mask``/``attention_mask`` ``[B, L]``.
    """
    import torch
    import torch.nn.functional as F

    model = build_model(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    ids = torch.from_numpy(batch["input_ids"]).long()
    tgt = torch.from_numpy(batch["targets"]).long()
    lmask = torch.from_numpy(batch["loss_mask"]).float()
    amask = torch.from_numpy(batch["attention_mask"]).long()

    def step():
        logits = model(input_ids=ids, attention_mask=amask).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        loss = (nll * lmask.reshape(-1)).sum() / lmask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    timing = time_calls(step, reps=reps, warmup=warmup)
    return {"timing": timing, "threads": torch.get_num_threads()}


def reward_step_time(shape: dict[str, Any], batch: dict[str, np.ndarray], *, reps: int, warmup: int = 1) -> dict[str, Any]:
    """A plain PyTorch Bradley-Terry step: chosen and rejected in one forward of a scalar-head model.

    ``loss = -mean(log σ(r_chosen - r_rejected))``; ``batch``: ``chosen_ids/chosen_mask/rejected_ids/
    rejected_mask`` ``[B, L]`` (full rows, so the sequence head reads the last position).
    """
    import torch
    import torch.nn.functional as F

    model = build_model(shape, head="scalar")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    ids = torch.from_numpy(np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])).long()
    mask = torch.from_numpy(np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])).long()
    n = batch["chosen_ids"].shape[0]

    def step():
        r = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        loss = -F.logsigmoid(r[:n] - r[n:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    timing = time_calls(step, reps=reps, warmup=warmup)
    return {"timing": timing, "threads": torch.get_num_threads()}


def word_tokenizer(vocab_size: int, *, pad_id: int, eos_id: int, bos_id: int):
    """A PreTrainedTokenizerFast whose vocabulary is ``t0 .. t{V-1}`` (one word per id), offline."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=f"t{pad_id}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=f"t{pad_id}",
        eos_token=f"t{eos_id}",
        bos_token=f"t{bos_id}",
        unk_token=f"t{pad_id}",
        padding_side="left",
    )


def trl_ppo_iteration_time(
    shape: dict[str, Any],
    prompts: np.ndarray,
    *,
    response_length: int,
    epochs: int,
    minibatches: int,
    iterations: int,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Seconds per iteration of trl 1.12's ``PPOTrainer`` with four random models of ``shape``.

    Policy and reference: causal LMs; reward and value: ``AutoModelForSequenceClassification``
    (num_labels=1), as TRL's PPO example builds them. One iteration = rollout of ``response_length``
    sampled tokens for the ``B`` prompts, reference/value/reward forwards, GAE, and ``epochs`` ×
    ``minibatches`` clipped updates with one optimizer step per minibatch of ``B / minibatches``
    rows, as ours (``per_device_train_batch_size = B`` and no gradient accumulation: TRL's rollout
    batch is ``per_device_train_batch_size × gradient_accumulation_steps``, and accumulating over
    the minibatches would make one optimizer step per epoch). float32, no gradient checkpointing
    (TRL's default turns it on; off here so both sides do the same work), no stop token (every
    response full length). ``iterations`` runs are timed by a callback at each step end; the first
    is warm-up. ``gc_s`` is the time per timed iteration inside ``gc.collect()``, which TRL calls
    twice per iteration: it grows with every live Python object in the process, so the peer must
    run in a process of its own (``run.in_child``), not after JAX has filled the heap.
    """
    import gc

    import torch
    from datasets import Dataset
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if iterations < 2:
        raise ValueError(f"iterations must be >= 2 (the first is warm-up), got {iterations}")
    batch = prompts.shape[0]
    if batch % minibatches:
        raise ValueError(f"minibatches={minibatches} does not divide the batch of {batch} prompts")
    ends: list[float] = []
    gc_times: list[float] = []

    class _Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            gc_times.clear()

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    collect = gc.collect

    def timed_collect(*a, **kw):  # measures what TRL's own gc.collect() calls cost; same behaviour
        t = time.perf_counter()
        try:
            return collect(*a, **kw)
        finally:
            gc_times.append(time.perf_counter() - t)

    tok = word_tokenizer(
        shape["vocab_size"], pad_id=shape["pad_token_id"], eos_id=shape["eos_token_id"], bos_id=shape["bos_token_id"]
    )
    policy = build_model(shape, seed=0)
    ref = build_model(shape, seed=0)
    reward = build_model(shape, head="scalar", seed=1)
    value = build_model(shape, head="scalar", seed=2)
    data = Dataset.from_dict({"input_ids": [list(map(int, row)) for row in prompts]})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PPOConfig(
            output_dir=out_dir or tmp,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            num_mini_batches=minibatches,
            num_ppo_epochs=epochs,
            response_length=response_length,
            local_rollout_forward_batch_size=batch,
            total_episodes=batch * iterations,
            num_sample_generations=0,
            temperature=1.0,
            learning_rate=1e-5,
            bf16=False,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        )
        trainer = PPOTrainer(
            args=cfg,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            train_dataset=data,
            value_model=value,
            callbacks=[_Clock()],
        )
        steps = [0]
        hook = register_optimizer_step_post_hook(
            lambda *a, **kw: steps.__setitem__(0, steps[0] + 1))
        gc.collect = timed_collect
        try:
            trainer.train()
        finally:
            gc.collect = collect
            hook.remove()
    per_iter = np.diff(np.asarray(ends))
    if len(per_iter) != iterations:
        raise RuntimeError(f"TRL PPOTrainer ran {len(per_iter)} iterations, expected {iterations}")
    timed = per_iter[1:]
    return {
        "median_s": float(np.median(timed)),
        "best_s": float(np.min(timed)),
        "times_s": [float(t) for t in per_iter],
        "threads": torch.get_num_threads(),
        "optimizer_steps": steps[0],  # counted: iterations x epochs x minibatches
        "gc_s_per_iteration": float(np.sum(gc_times)) / iterations,  # mean over all iterations
        "live_objects": len(gc.get_objects()),
    }


def sft_trainer_step_time(shape: dict[str, Any], batch: dict[str, np.ndarray], *, reps: int,
                          warmup: int = 1) -> dict[str, Any]:
    """Seconds per optimizer step of trl 1.12's ``SFTTrainer`` on the same rows (its own defaults
    otherwise: loss on every token, its per-step token-accuracy/entropy metrics).

    float32, no gradient checkpointing, AdamW (lr 1e-5, weight decay 0.01, constant schedule),
    gradient clipping at norm 1 (the Trainer default), like the plain loop. Rows are the ``L``
    ``input_ids`` of the batch (the model shifts labels inside), repeated for every step. Times
    come from a callback at each step end; the first ``warmup`` steps are not counted.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ends: list[float] = []

    class _Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    steps = warmup + reps
    b, seq = batch["input_ids"].shape
    rows = [list(map(int, r)) for r in batch["input_ids"]] * steps
    tok = word_tokenizer(
        shape["vocab_size"], pad_id=shape["pad_token_id"], eos_id=shape["eos_token_id"], bos_id=shape["bos_token_id"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=b, max_steps=steps, learning_rate=1e-5, weight_decay=0.01,
            lr_scheduler_type="constant", max_grad_norm=1.0, bf16=False, gradient_checkpointing=False,
            report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=True,
            max_length=seq, packing=False, dataloader_num_workers=0, seed=0,
        )
        trainer = SFTTrainer(model=build_model(shape), args=cfg, train_dataset=Dataset.from_dict({"input_ids": rows}),
                             processing_class=tok, callbacks=[_Clock()])
        trainer.train()
    per_step = np.diff(np.asarray(ends))
    if len(per_step) != steps:
        raise RuntimeError(f"SFTTrainer ran {len(per_step)} steps, expected {steps}")
    timed = per_step[warmup:]
    return {"timing": Timing(float(np.median(timed)), float(np.min(timed)), tuple(float(t) for t in timed),
                             float(np.sum(per_step[:warmup])))}
