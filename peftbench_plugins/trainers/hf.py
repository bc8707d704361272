"""Trainer plugin ``hf``: the transformers Trainer (checkpoints, loss logging, progress bar)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from peftbench.api import Options, PeftbenchError, TrainerPlugin, TrainResult, hookimpl
from peftbench.kit import (first_non_finite, load_finished_checkpoint, memory_in_use_bytes, peak_memory_bytes,
                           reset_peak_memory, unpack_4bit_layers)

# The modules transformers' is_<tracker>_available() look for. Asking transformers itself means
# importing transformers.integrations, seconds that `peftbench validate` should not spend.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "trackio": ("trackio",)}


class HfTrainerOptions(Options):
    epochs: float = Field(1, gt=0, description="passes over the training split")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimiser steps (overrides epochs)")
    batch_size: int = Field(4, gt=0, description="examples per device per forward pass (with packing, only batch_size x grad_accum matters)")
    grad_accum: int = Field(4, gt=0, description="forward passes per optimiser step (effective batch = batch_size x grad_accum x GPUs)")
    packing: bool | Literal["auto"] = Field(
        "auto", description="concatenate a step's examples into rows without padding (attention kept within each example); "
        "the same examples and loss per step, no FLOPs on padding; auto: only where a varlen attention kernel exists (CUDA)")
    max_tokens_per_batch: int | None = Field(16384, gt=0, description="with packing: most tokens in one forward/backward "
                                             "pass; a step's examples run in as few passes as fit (null: one pass per step)")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the decoder layers (fused kernels, dynamic lengths) while training: the same "
        "computation with fewer kernel launches, after a first minute of compiling; only on a GPU with triton, eager "
        "elsewhere; auto: wherever available")
    memory_lean: bool = Field(False, description="for small GPUs: gradient checkpointing and passes of at most 2048 tokens")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scheduler: str = Field("linear", description="transformers scheduler name (linear, cosine, constant_with_warmup, ...)")
    warmup_steps: int = Field(50, ge=0, description="optimiser steps of linear warm-up")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    optim: str = Field("auto", description="transformers optimiser name; 8-bit/paged fall back to adamw_torch without a GPU; "
                       "auto: adamw_torch_fused on a CUDA GPU (one fused update of every adapter tensor), else adamw_torch")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations in backward: less memory, ~30% slower; auto: only when memory_lean "
        "or when the largest pass's activations would not fit in the free GPU memory")
    logging_steps: int = Field(10, gt=0, description="log the training loss every N steps")
    save_steps: int = Field(100, gt=0, description="checkpoint every N steps (resume restarts from the last)")
    eval_steps: int | None = Field(100, gt=0, description="validation loss every N steps; null to skip")
    save_total_limit: int | None = Field(2, gt=0, description="checkpoints kept on disk")
    max_eval_samples: int | None = Field(200, gt=0, description="validation rows used for the validation loss")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="experiment trackers the Trainer logs to (must be installed); tensorboard writes to checkpoints/runs/",
    )

    @field_validator("save_steps")
    @classmethod
    def _checkpoints_at_loss_logs(cls, save_steps: int, info: ValidationInfo) -> int:
        # The Trainer's logged loss averages the steps since the last log; a run resumed from a checkpoint
        # between two logs would record an average over fewer steps than the uninterrupted run does.
        logging_steps = info.data.get("logging_steps")
        if logging_steps and save_steps % logging_steps:
            raise ValueError(f"must be a multiple of trainer.logging_steps ({logging_steps}), so that a resumed run "
                             "records the same losses as an uninterrupted one")
        return save_steps

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        # transformers only checks these names when TrainingArguments is built, mid-run: check them here.
        from transformers.training_args import OptimizerNames

        return name if name == "auto" else _one_of(name, [o.value for o in OptimizerNames], "optimiser")

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        from transformers.trainer_utils import SchedulerType

        return _one_of(name, [t.value for t in SchedulerType], "scheduler")

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, trackers: list[str]) -> list[str]:
        import importlib.util

        missing = [t for t in trackers if not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[t])]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed (pip install {' '.join(missing)}, or remove it from report_to)")
        return trackers


def _one_of(name: str, known: list[str], what: str) -> str:
    import difflib

    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown transformers {what} '{name}'; {hint}known: {', '.join(known)}")
    return name


class HfTrainer(TrainerPlugin):
    name = "hf"
    Options = HfTrainerOptions

    def train(self, model, tokenizer, train_dataset, eval_dataset, options: HfTrainerOptions, ctx,
              callbacks=()) -> TrainResult:
        """``callbacks``: extra transformers TrainerCallbacks (benchmarks time the steps with one)."""
        from peftbench_plugins.trainers.packing import plan_steps, step_trainer_class

        policy = ctx.policy
        plan = plan_steps(model, tokenizer, train_dataset, options, policy.device)
        for note in plan.notes:
            policy.note(note)
        use_eval = options.eval_steps is not None and eval_dataset is not None and len(eval_dataset) > 0
        if use_eval and options.max_eval_samples:
            eval_dataset = eval_dataset.select(range(min(options.max_eval_samples, len(eval_dataset))))
        args = training_arguments(options, plan, ctx, use_eval)
        memory = memory_sampler(policy.device)
        trainer = step_trainer_class()(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset if use_eval else None,
            data_collator=plan.collator,
            processing_class=tokenizer,
            callbacks=[memory, learning_guard(model), *callbacks],
        )
        start = time.perf_counter()
        checkpoint = run_training(trainer, model, plan, ctx)
        seconds = time.perf_counter() - start
        _raise_if_diverged(trainer.state.log_history)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return TrainResult(
            train_time_s=seconds,
            steps=trainer.state.global_step,
            tokens_seen=int(trainer.state.num_input_tokens_seen),
            final_loss=losses[-1] if losses else None,
            loss_history=list(trainer.state.log_history),
            peak_memory_bytes=peak_memory_bytes(policy.device),
            global_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            memory_samples=memory.samples,
            resumed_from_step=int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None,
        )


def training_arguments(options: HfTrainerOptions, plan, ctx, use_eval: bool):
    """transformers' TrainingArguments for the recipe's options and the step plan."""
    from transformers import TrainingArguments

    policy = ctx.policy
    return TrainingArguments(
        output_dir=str(ctx.run_dir / "checkpoints"),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        # Unless plan.stock, one Trainer batch is one optimiser step, which StepCollator splits into passes.
        per_device_train_batch_size=plan.per_device_batch,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        optim=policy.optimizer(resolve_optimizer(options.optim, policy.device)),
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        bf16=policy.device == "cuda" and policy.dtype_name == "bfloat16",
        fp16=policy.device == "cuda" and policy.dtype_name == "float16",
        use_cpu=policy.device == "cpu",
        logging_steps=options.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        eval_strategy="steps" if use_eval else "no",
        eval_steps=options.eval_steps if use_eval else None,
        seed=ctx.recipe.recipe.seed,
        data_seed=ctx.recipe.recipe.seed,
        report_to=options.report_to or "none",
        include_num_input_tokens_seen="non_padding" if plan.stock else "no",  # else StepTrainer counts them
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Every trainable parameter of a PEFT method takes part in every forward pass, so DDP need
        # not walk the autograd graph after each backward looking for unused ones.
        ddp_find_unused_parameters=False,
    )


def run_training(trainer, model, plan, ctx) -> str | None:
    """Train (or resume, or take a finished checkpoint as it is); the checkpoint resumed from, if any."""
    from peftbench_plugins.trainers.packing import compiled_layers, fused_4bit_layers, packed_attention

    # A 4-bit layer that an evaluation left packed (bitsandbytes on CPUs with AVX-512 BF16) would be
    # unpacked by its forward hook, but DDP broadcasts rank 0's parameters when it wraps the model, before
    # any forward: a packed weight has as many bytes in another layout and would scramble the others'.
    unpack_4bit_layers(model)
    reset_peak_memory(ctx.policy.device)
    checkpoint = _last_checkpoint(trainer.args.output_dir) if ctx.resume else None
    if checkpoint and _finished(checkpoint):
        load_finished_checkpoint(trainer, checkpoint)  # nothing is left to train: take the checkpoint as it is
    else:
        with packed_attention(model, plan.varlen_attention), compiled_layers(model, plan.compile), \
                fused_4bit_layers(model, plan.compile):
            trainer.train(resume_from_checkpoint=checkpoint)
    return checkpoint


def resolve_optimizer(name: str, device: str) -> str:
    """``auto``: torch's fused AdamW on a CUDA GPU, else adamw_torch; any other name as it is. An adapter's optimiser
    state is megabytes, so bitsandbytes' paged 8-bit states save nothing there, and bitsandbytes 0.50's 8-bit
    optimizers call torch.cuda.synchronize() after every tensor's update (``Optimizer8bit.step``), which stalls a
    host-bound step (measured: benchmarks/results/2026-12-05/README.md)."""
    if name != "auto":
        return name
    return "adamw_torch_fused" if device == "cuda" else "adamw_torch"


def memory_sampler(device: str):
    """A TrainerCallback recording the memory in use after every optimiser step (peft's reports give
    its mean and 99th percentile besides the peak)."""
    from transformers import TrainerCallback

    class _MemorySampler(TrainerCallback):
        def __init__(self):
            self.samples: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            used = memory_in_use_bytes(device)
            if used is not None:
                self.samples.append(used)

    return _MemorySampler()


class TrainingNotLearning(PeftbenchError):
    """A run whose optimiser steps change nothing: it would "succeed" and report the base model."""


# Optimiser steps whose gradient norm is checked: one zero step can be legitimate (a method whose
# first gradients vanish by construction), every one of the first few cannot.
ZERO_GRAD_STEPS = 3
# Trainable elements copied to check, after training, that the parameters moved (a sample is enough:
# a method that learns changes every one of its tensors; PEFT methods rarely have more anyway).
SNAPSHOT_ELEMENTS = 20_000_000

NOT_LEARNING_FIX = (
    "run `peftbench doctor` (it trains one 4-bit step on this machine); on a 4-bit base update bitsandbytes or "
    "use method lora; check that the method's trainable parameters take part in the forward pass"
)


def learning_guard(model):
    """A TrainerCallback that stops a run which trains nothing, loudly: the first optimiser steps all
    have a zero gradient norm, or training ends with the trainable parameters unchanged. (Such a run
    used to end as a success that scored like the base model; see peftbench.compat.bitsandbytes for one cause.)"""
    import torch
    from transformers import TrainerCallback

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    class _LearningGuard(TrainerCallback):
        def __init__(self):
            self.snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.checked = self.zero = self.steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            budget = SNAPSHOT_ELEMENTS
            for _, p in params:
                if p.numel() <= budget:
                    self.snapshot.append((p, p.detach().clone()))
                    budget -= p.numel()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.checked >= ZERO_GRAD_STEPS:
                return
            self.checked += 1
            with torch.no_grad():
                norm = sum(float(p.grad.float().pow(2).sum()) for _, p in params if p.grad is not None)
            self.zero += norm == 0.0
            if self.zero == ZERO_GRAD_STEPS:
                raise TrainingNotLearning(
                    f"training is not learning: the gradient of the {len(params)} trainable tensors was exactly 0 in "
                    f"each of the first {ZERO_GRAD_STEPS} optimiser steps (nothing reaches the adapter from the loss).",
                    NOT_LEARNING_FIX)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            if self.steps and self.snapshot and all(torch.equal(p.detach(), before) for p, before in self.snapshot):
                raise TrainingNotLearning(
                    f"training is not learning: after {self.steps} optimiser steps the trainable parameters are "
                    "exactly as they started.", NOT_LEARNING_FIX + "; a learning rate of 0 or a frozen optimiser does this too")

    return _LearningGuard()


def _finished(checkpoint: str) -> bool:
    """Whether the checkpoint was written at the last step of its schedule."""
    import json

    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def _last_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N written to the end, or None. The Trainer writes trainer_state.json
    last, so a process killed while saving leaves a newer checkpoint without a readable one, which
    transformers' get_last_checkpoint would pick and fail to load: skip it."""
    import json
    import re
    from pathlib import Path

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from peftbench.kit import console

    root = Path(output_dir)
    steps = sorted(((int(m.group(1)), d) for d in (root.iterdir() if root.is_dir() else ())
                    if d.is_dir() and (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", d.name))), reverse=True)
    for step, directory in steps:
        try:
            json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            console.print(f"[yellow]resume:[/] skipping {directory.name}, written only in part")
            continue
        console.print(f"resume: continuing from {directory.name} (step {step})")
        return str(directory)
    console.print("[yellow]resume:[/] no complete checkpoint yet, training from the start")
    return None


def _raise_if_diverged(log_history: list[dict]) -> None:
    """A NaN loss ruins the adapter silently: the Trainer's logging_nan_inf_filter logs NaN steps as
    averages of earlier ones (0.0 once every step is NaN), so look at grad norms and eval losses too."""
    found = first_non_finite(log_history)
    if found:
        key, value, step = found
        first_step = step == 1  # before the learning rate has done anything
        raise PeftbenchError(
            f"training diverged: {key} became {value} at step {step}"
            + (" (a numerical problem in the forward/backward pass, not the learning rate)." if first_step else "."),
            ("compute in fp32 (model.dtype=float32) to find the culprit" if first_step else
             "lower trainer.learning_rate, or compute in fp32 (model.dtype=float32)") + "; checkpoints are kept.",
        )


@hookimpl
def peftbench_register_trainers(register):
    register(HfTrainer)
