"""``MethodConformance``: the checks every method plugin must pass, following what it declares.

A plugin author subclasses it in a test module, under a name pytest collects (``Test...``), and
names the method and its options as a recipe would::

    from peftbench.testing import MethodConformance

    class TestMyMethod(MethodConformance):
        method = {"name": "my_method", "rank": 4}

Each check runs the plugin through the same interface the runner uses (``apply``, ``save``, ``load``,
``merge``) on the tiny model fixture, in a second or two on a CPU. What is checked follows the
plugin's ``capabilities``: a mergeable method must merge into a plain transformers model that
matches the unmerged one; any other must refuse with ``StageRefused`` and a reason.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ClassVar

import pytest


class MethodConformance:
    method: ClassVar[dict[str, Any]] = {}  # {"name": <registered method>, <option>: <value>, ...}
    # Plugin objects (modules) to register for these tests, for a plugin that is not installed;
    # an installed plugin is found through its entry point and needs nothing here.
    plugins: ClassVar[tuple] = ()
    # Trainable share of all parameters. The tiny model's token embeddings are ~97% of it, so a method
    # above 10% has left the embeddings or the output head trainable: the classic PEFT mistake, and
    # one that makes the "adapter" as big as the model. (A method that also trains some full weight
    # matrices is caught by the second check: fewer trainable parameters than the transformer blocks.)
    max_trainable_fraction: ClassVar[float] = 0.10
    learning_rate: ClassVar[float] = 1e-2  # large enough that one step visibly changes a tiny model
    # Merging reorders float arithmetic (W·x + B·A·x vs (W + B·A)·x), so outputs agree only to rounding.
    merge_tolerance: ClassVar[dict[str, float]] = {"rtol": 1e-4, "atol": 1e-4}
    # save -> load must reproduce the trained model; a hair of tolerance for non-deterministic GPU kernels.
    reload_tolerance: ClassVar[dict[str, float]] = {"rtol": 0.0, "atol": 1e-6}

    # --- fixtures -------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def conformance_host(self):
        from peftbench.host import get_host, registered

        if not self.method.get("name"):
            pytest.fail(f"{type(self).__name__} must set method = {{'name': ..., <options>}}")
        # A plugin that is also installed is already loaded through its entry point; registering the
        # same module again would register its methods twice.
        loaded = {getattr(p, "__name__", None) for _, p in get_host().pm.list_name_plugin()}
        with ExitStack() as stack:
            for plugin in self.plugins:
                if getattr(plugin, "__name__", None) not in loaded:
                    stack.enter_context(registered(plugin))
            yield get_host()

    @pytest.fixture(scope="class")
    def conformance_inputs(self, conformance_host, tiny_model_dir, tiny_data_dir):
        """A padded training batch (two dialogues with their summaries, cut short: the tiny model's
        49k-word output layer dominates the cost) from the tiny dataset."""
        from datasets import load_dataset
        from transformers import DataCollatorForSeq2Seq

        from peftbench.pipeline.chat import tokenize_for_training
        from peftbench.pipeline.modeling import load_tokenizer
        from peftbench.pipeline.recipe import PromptSection

        tokenizer = load_tokenizer(str(tiny_model_dir))
        rows = load_dataset("json", data_files=str(tiny_data_dir / "train.jsonl"), split="train").select(range(2))
        features = tokenize_for_training(rows, tokenizer, PromptSection(max_source_tokens=48, max_target_tokens=8))
        keep = ("input_ids", "attention_mask", "labels")
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        batch = collate([{k: f[k] for k in keep} for f in features])
        return tokenizer, dict(batch)

    @pytest.fixture
    def conformance_ctx(self, conformance_host, tiny_model_dir, tiny_data_dir, tmp_path):
        """A RunContext for the method on the tiny model, as the runner builds it."""
        from peftbench.pipeline.context import RunContext
        from peftbench.pipeline.device import resolve_policy
        from peftbench.pipeline.recipe import validate_recipe
        from peftbench.testing.tiny import tiny_recipe

        # float32 on every device: the checks are about the method, and bf16 rounding (the GPU default)
        # would swamp the tolerances that make them sharp.
        raw = tiny_recipe(tiny_model_dir, tiny_data_dir, dict(self.method), model={"dtype": "float32"})
        recipe = validate_recipe(raw, host=conformance_host)
        return RunContext(recipe=recipe, run_dir=tmp_path / "run", policy=resolve_policy(recipe.recipe.model.dtype),
                          model_source=str(tiny_model_dir))

    # --- helpers --------------------------------------------------------------------------------

    def applied(self, ctx):
        """A fresh base model with the method applied, as the runner's "method" stage does."""
        return ctx.recipe.method.apply(ctx.load_base_model(), ctx.recipe.method_options, ctx)

    def logits(self, model, batch):
        import torch

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        model.train(was_training)
        return out.logits.float().cpu()

    def train_step(self, model, batch) -> float:
        import torch

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.learning_rate)
        device = next(model.parameters()).device
        model.train()
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def trained(self, ctx, batch):
        model = self.applied(ctx)
        self.train_step(model, batch)
        return model

    # --- checks ---------------------------------------------------------------------------------

    def test_plugin_declares_itself(self, conformance_ctx):
        from peftbench.api import Capabilities

        plugin = conformance_ctx.recipe.method
        assert plugin.name == self.method["name"]
        assert isinstance(plugin.capabilities, Capabilities)
        undocumented = [f for f, info in plugin.Options.model_fields.items() if not (info.description or "").strip()]
        assert not undocumented, f"options without a description (the help `peftbench methods` shows): {undocumented}"
        extra = plugin.capabilities.provides
        assert all(isinstance(c, str) and c for c in extra), f"capabilities in provides must be names: {sorted(extra, key=str)}"

    def test_trainable_parameters_are_a_small_fraction(self, conformance_ctx):
        from peftbench.pipeline.resources import count_parameters

        model = self.applied(conformance_ctx)
        trainable, total = count_parameters(model)
        assert trainable > 0, "the method leaves nothing trainable"
        assert trainable / total < self.max_trainable_fraction, (
            f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.1f}%): "
            "are the embeddings or the output head trainable?"
        )
        embeddings = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None for p in m.parameters()}
        blocks = total - sum(embeddings.values())
        assert trainable < blocks, f"{trainable:,} trainable parameters: more than the {blocks:,} of the transformer blocks"

    def test_a_training_step_changes_outputs_and_only_trainable_parameters(self, conformance_ctx, conformance_inputs):
        import torch

        _, batch = conformance_inputs
        model = self.applied(conformance_ctx)
        before = self.logits(model, batch)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        loss = self.train_step(model, batch)
        assert loss == loss, "the training loss is NaN"
        after = self.logits(model, batch)
        assert (after - before).abs().max() > 1e-6, "one training step did not change the model's outputs"
        changed = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, frozen[n])]
        assert not changed, f"frozen parameters changed in training: {changed[:5]}"

    def test_save_then_load_gives_identical_outputs(self, conformance_ctx, conformance_inputs, tmp_path):
        import torch

        _, batch = conformance_inputs
        ctx = conformance_ctx
        method, options = ctx.recipe.method, ctx.recipe.method_options
        model = self.trained(ctx, batch)
        method.save(model, tmp_path / "saved")
        assert any((tmp_path / "saved").iterdir()), "save() wrote nothing"
        loaded = method.load(ctx.load_base_model(), tmp_path / "saved", options)
        torch.testing.assert_close(self.logits(loaded, batch), self.logits(model, batch), **self.reload_tolerance)

    def test_merge_follows_the_mergeable_capability(self, conformance_ctx, conformance_inputs, tmp_path):
        import torch
        from transformers import AutoModelForCausalLM, PreTrainedModel

        from peftbench.errors import StageRefused

        _, batch = conformance_inputs
        ctx = conformance_ctx
        method, options = ctx.recipe.method, ctx.recipe.method_options
        model = self.trained(ctx, batch)
        method.save(model, ctx.adapter_dir)  # the runner saves before any export; merge may read it
        if not method.capabilities.mergeable:
            with pytest.raises(StageRefused) as refusal:
                method.merge(model, options, ctx)
            assert refusal.value.problem and refusal.value.fix, "a refusal must say why and what to do instead"
            return

        if method.quantization_config(options, ctx.policy) is None:
            expected = self.logits(model, batch)
        else:
            # Trained on a quantised base, merged into 16-bit weights (the original ones, or the 4-bit ones
            # dequantised: the method's merge_into): the merge must match the trained weights applied
            # to that same 16-bit base (the quantisation error is not the merge's).
            from peftbench.kit import base_for_merge

            target = getattr(options, "merge_into", "original")
            expected = self.logits(method.load(base_for_merge(ctx, target), ctx.adapter_dir, options), batch)
        merged = method.merge(model, options, ctx)
        assert isinstance(merged, PreTrainedModel), f"merge() returned {type(merged).__name__}, not a transformers model"
        leftovers = {type(m).__name__ for m in merged.modules() if type(m).__module__.startswith("peft.")}
        assert not leftovers, f"the merged model still holds peft layers: {sorted(leftovers)}"
        torch.testing.assert_close(self.logits(merged, batch), expected, **self.merge_tolerance)

        # A merged model is a standard checkpoint: transformers loads it with no peftbench code.
        merged.save_pretrained(tmp_path / "merged")
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        torch.testing.assert_close(self.logits(reloaded, batch), expected, **self.merge_tolerance)

    def test_batched_left_padded_generation_matches_one_by_one(self, conformance_ctx, conformance_inputs):
        """Evaluation generates in left-padded batches: the method must not see the padding."""
        import torch

        from peftbench.pipeline.chat import encode_prompt
        from peftbench.pipeline.recipe import PromptSection

        tokenizer, batch = conformance_inputs
        model = self.trained(conformance_ctx, batch)
        model.eval()
        prompts = [encode_prompt(tokenizer, PromptSection(), d) for d in ("A: Hi!\nB: Hello.", "A: Lunch at noon?\nB: Sure, "
                                                                           "see you at the usual place.\nA: Great.")]
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        settings = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                        pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            batched = model.generate(input_ids=input_ids, attention_mask=attention, **settings).scores
            for row, prompt in enumerate(prompts):
                ids = torch.tensor([prompt], device=device)
                alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings).scores
                for step, (b, a) in enumerate(zip(batched, alone)):
                    torch.testing.assert_close(b[row].float().cpu(), a[0].float().cpu(), rtol=1e-3, atol=1e-3,
                                               msg=lambda m: f"prompt {row}, new token {step}: {m}")
