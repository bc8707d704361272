"""BitFit (Ben Zaken et al., 2022): train the bias terms only, everything else frozen.

Llama-family models have no bias terms, so BitFit first gives their projections zero-initialised
biases through the architecture's own config flags (Llama: ``attention_bias`` for q/k/v/o,
``mlp_bias`` for gate/up/down; Gemma and Qwen3: ``attention_bias``; see peftbench/targets.py).
Zero biases leave the base model's outputs exactly as they were, and because the flags are ordinary
config fields, the trained model is a standard checkpoint: its config.json carries the flags, so
``AutoModelForCausalLM.from_pretrained`` and llama.cpp's converter load it with no peftbench code.
Qwen2 (biased q/k/v) and GPT-2 (biases everywhere) need no new terms. transformers' Mistral has
neither biases nor a flag to add them, so BitFit refuses it with a clear error.

What is saved is the biases alone: ``bitfit_biases.safetensors`` (every bias tensor, by parameter
name) and ``bitfit.json`` (the config flags the base must be loaded with, and which biases trained).
The trained model needs no merging: it already is the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from peftbench.api import Capabilities, MethodPlugin, Options, PeftbenchError, hookimpl
from peftbench.kit import ARCHITECTURES, module_matches, targets_for

BIASES_FILE = "bitfit_biases.safetensors"
CONFIG_FILE = "bitfit.json"


class BitFitOptions(Options):
    target_modules: list[str] | None = Field(
        None, description="modules whose bias terms train; default: every bias term in the model"
    )
    add_bias_terms: bool = Field(
        True, description="turn on the architecture's bias flags (Llama: attention_bias, mlp_bias) so projections "
                          "without biases get zero-initialised ones"
    )


def _is_bias(parameter_name: str) -> bool:
    return parameter_name.rsplit(".", 1)[-1] == "bias"


class BitFit(MethodPlugin):
    """Bias-only fine-tuning of a plain transformers model (no peft wrapper)."""

    name = "bitfit"
    Options = BitFitOptions
    capabilities = Capabilities(
        mergeable=True, uses_peft=False,
        notes="adds zero biases through config flags (Llama: attention_bias, mlp_bias); the trained model is "
              "a standard checkpoint",
    )

    def bias_flags(self, options: BitFitOptions, model_config) -> list[str]:
        if not options.add_bias_terms:
            return []
        if options.target_modules is None:
            return list(targets_for(model_config).bias_flags)  # unknown architecture: asks for target_modules
        known = ARCHITECTURES.get(getattr(model_config, "model_type", None))
        return list(known.bias_flags) if known else []

    def prepare_model_config(self, options: BitFitOptions, model_config) -> None:
        for flag in self.bias_flags(options, model_config):
            setattr(model_config, flag, True)

    def apply(self, model, options: BitFitOptions, ctx):
        import torch

        # transformers (5.x) zero-initialises biases missing from the checkpoint, but that is its
        # init scheme, not a promise: zero them here so training provably starts from the base model.
        with torch.no_grad():
            for name in _added_parameters(model, ctx):
                model.get_parameter(name).zero_()
        trained = []
        for name, parameter in model.named_parameters():
            module_name = name.rsplit(".", 1)[0]
            wanted = _is_bias(name) and (
                options.target_modules is None or any(module_matches(module_name, t) for t in options.target_modules)
            )
            parameter.requires_grad_(wanted)
            if wanted:
                trained.append(name)
        if not trained:
            model_type = getattr(model.config, "model_type", "?")
            raise PeftbenchError(
                f"bitfit found no bias terms to train in this '{model_type}' model"
                + (f" among modules {options.target_modules}" if options.target_modules else "")
                + " (and knows no config flag that adds them).",
                "use another method (e.g. lora), or set method.target_modules to modules that have biases.",
            )
        return model

    def save(self, model, directory) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        biases = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if _is_bias(n)}
        save_file(biases, str(directory / BIASES_FILE))
        flags = {f: getattr(model.config, f) for f in _known_flags(model.config)}
        info = {
            "method": self.name,
            "model_type": getattr(model.config, "model_type", None),
            "config_flags": flags,  # load the base with these set (prepare_model_config does)
            "trained": [n for n, p in model.named_parameters() if p.requires_grad],
        }
        (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def load(self, model, directory, options: BitFitOptions):
        from safetensors.torch import load_file

        directory = Path(directory)
        info = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        missing_flags = [f for f, v in info["config_flags"].items() if v and not getattr(model.config, f, False)]
        if missing_flags:
            raise PeftbenchError(
                f"the biases in '{directory}' need a base model loaded with {', '.join(missing_flags)}=True.",
                "load the base through peftbench with method bitfit (it sets these flags), or set them on its config.",
            )
        biases = load_file(str(directory / BIASES_FILE))
        result = model.load_state_dict(biases, strict=False)
        if result.unexpected_keys:
            raise PeftbenchError(
                f"'{directory}' holds biases this model lacks: {result.unexpected_keys[:3]}.",
                "load them into the same base model (and architecture) they were trained on.",
            )
        model.requires_grad_(False)
        return model

    def merge(self, model, options, ctx):
        """The trained model already is a standard checkpoint: biases in place, flags in its config."""
        return model


def _known_flags(model_config) -> list[str]:
    return sorted({f for arch in ARCHITECTURES.values() for f in arch.bias_flags if hasattr(model_config, f)})


def _added_parameters(model, ctx) -> list[str]:
    """Parameters the model has but a model built from the checkpoint's own config lacks (the
    biases our config flags added). Built on the meta device: names only, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = ctx.recipe.recipe.model.trust_remote_code
    original = AutoConfig.from_pretrained(ctx.model_source, trust_remote_code=trust, revision=ctx.recipe.recipe.model.revision)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(original, trust_remote_code=trust)
    existing = {name for name, _ in skeleton.named_parameters()}
    return [name for name, _ in model.named_parameters() if name not in existing]


@hookimpl
def peftbench_register_methods(register):
    register(BitFit)
