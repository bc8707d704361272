"""The plugin kit: the helpers peftbench supports for plugin authors.

A plugin imports two modules of peftbench: ``peftbench.api`` (hooks, base classes, typed results:
the contract) and this one (helpers). Everything else in peftbench is internal and may change
without notice; ``tests/test_architecture.py`` fails when a built-in plugin imports anything else, so
the built-in plugins show what a third-party plugin can do. docs/plugin-kit.md lists each helper.

Tests of a plugin use the pytest plugin ``peftbench.testing`` (fixtures and a conformance class).
"""

from __future__ import annotations

# Output and files: one console for the tool; writes that never leave a half-written file.
from peftbench.console import console
from peftbench.files import atomic_directory, atomic_write_json, atomic_write_text, dir_size, human_bytes, read_json
from peftbench.library_output import quiet_progress_bars, run_log

# Native code that may crash (llama.cpp, CUDA kernels): run it in a child process.
from peftbench.isolation import NativeCrash, run_isolated, run_isolated_side_by_side

# Models: which modules to adapt, 4-bit bases, merging, sizes. ``merged_checkpoint(ctx)``: the run's
# exports/merged/ checkpoint, written once per adapter, for exporters that convert plain weights.
from peftbench.pipeline.merging import merged_checkpoint
from peftbench.pipeline.modeling import MERGE_TARGET_HELP, MergeTarget, base_for_merge, four_bit_config, load_tokenizer
# The offline default model (a GGUF inside an installed package) and where a ``pkg:`` name lies.
from peftbench.pipeline.modeling import OFFLINE_MODEL, resolve_package_file
from peftbench.pipeline.resources import merged_model_bytes
from peftbench.pipeline.targets import ARCHITECTURES, module_matches, resolve_targets, targets_for, wrap_with_peft

# Prompts, as trained and evaluated: the chat template with assistant-only labels.
from peftbench.pipeline.chat import IGNORE_INDEX, build_messages, encode_prompt, end_of_turn
from peftbench.pipeline.recipe import prompt_settings

# Data: examples of any registered dataset plugin.
from peftbench.host import load_examples

# Training: memory figures the runner records, divergence, 4-bit layers kept trainable.
from peftbench.compat.bitsandbytes import unpack_all as unpack_4bit_layers
from peftbench.compat.transformers import clip_trainable_grad_norm, load_finished_checkpoint
from peftbench.pipeline.device import free_gpu_memory, memory_in_use_bytes, peak_memory_bytes, reset_peak_memory
from peftbench.pipeline.record import first_non_finite

# Scores and the machine: ROUGE as the runner computes it; the CPU's instruction sets.
from peftbench.pipeline.environment import cpu_flags
from peftbench.pipeline.evaluation import ROUGE_TYPES, paired_rouge1_change, rouge

# Forgetting: the language-modelling loss on general text (the built-in paragraphs or a JSONL file),
# so that an exporter can score its own format on the same texts as the HF model.
from peftbench.pipeline.forgetting import MAX_TEXT_TOKENS, TextLoss, text_loss
from peftbench.pipeline.forgetting import load_texts as forgetting_texts

# Reports (report sections a plugin contributes through the hooks): a Markdown table as the
# reports write them; a run record's predictions file, read back.
from peftbench.pipeline.report import markdown_table
from peftbench.pipeline.evaluation import read_predictions

__all__ = [
    "console", "atomic_directory", "atomic_write_json", "atomic_write_text", "dir_size", "human_bytes", "read_json",
    "quiet_progress_bars", "run_log",
    "NativeCrash", "run_isolated", "run_isolated_side_by_side",
    "merged_checkpoint", "MERGE_TARGET_HELP", "MergeTarget", "base_for_merge", "four_bit_config", "load_tokenizer", "merged_model_bytes",
    "OFFLINE_MODEL", "resolve_package_file",
    "ARCHITECTURES", "module_matches", "resolve_targets", "targets_for", "wrap_with_peft",
    "IGNORE_INDEX", "build_messages", "encode_prompt", "end_of_turn", "prompt_settings",
    "load_examples",
    "unpack_4bit_layers", "clip_trainable_grad_norm", "load_finished_checkpoint",
    "free_gpu_memory", "memory_in_use_bytes", "peak_memory_bytes", "reset_peak_memory", "first_non_finite",
    "cpu_flags", "ROUGE_TYPES", "paired_rouge1_change", "rouge",
    "MAX_TEXT_TOKENS", "TextLoss", "text_loss", "forgetting_texts",
    "markdown_table", "read_predictions",
]
