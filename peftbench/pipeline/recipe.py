"""Recipes: YAML files validated into typed sections, with ``key.sub=value`` overrides.

Validation collects every problem in one message (unknown keys with a did-you-mean, wrong types,
out-of-range values, unknown plugins, missing files, incompatible combinations) and builds nothing.
Plugins are named by registry name only, so a recipe can never make peftbench import code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftbench.errors import PeftbenchError, did_you_mean
from peftbench.host import Host, get_host


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name: str = Field(description="hub id, local model directory, local .gguf file, or pkg:PACKAGE/FILE.gguf")
    gguf_file: str | None = Field(None, description="GGUF file inside a hub repo or directory given as name")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run model code from the hub repo; off unless you trust it")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="compute dtype; auto = bf16 on GPUs that support it, fp32 on the CPU"
    )


class PromptSection(Section):
    system: str | None = Field(None, description="system message; None keeps the chat template's default")
    template: str = Field(
        "Summarize this dialogue:\n{dialogue}", description="user message; {dialogue} is replaced by the dialogue"
    )
    max_source_tokens: int = Field(448, gt=0, description="prompt tokens kept (dialogue truncated from the end)")
    max_target_tokens: int = Field(64, gt=0, description="summary tokens kept for training")

    @field_validator("template")
    @classmethod
    def _has_placeholder(cls, v: str) -> str:
        if "{dialogue}" not in v:
            raise ValueError("must contain the placeholder {dialogue}")
        return v


class EvaluationSection(Section):
    split: Literal["test", "validation", "selection"] = Field(
        "test", description="split scored before and after training; `selection` is carved from train (selection_size "
        "rows) for choosing settings, so that the split a comparison reports is never the one it selected on")
    selection_size: int = Field(500, gt=0, description="rows carved from train when split is `selection`")
    max_samples: int | None = Field(None, gt=0, description="score only the first N examples of the split")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="generation batch size; auto: on a GPU the largest (up to 1024) whose KV cache fits in a quarter "
        "of the free memory (a decoding step of a small model costs little more for hundreds of prompts than for one), 16 on the CPU")
    max_new_tokens: int = Field(64, gt=0, description="summary length limit when generating")
    baseline: bool = Field(True, description="also score the base model with the same prompt")
    num_beams: int = Field(1, gt=0, description="1: greedy decoding; more: beam search with that many beams")
    forgetting: bool = Field(True, description="also score the language-modelling loss on general text before and after "
                             "fine-tuning (what fine-tuning costs outside the task; 40 short paragraphs, cheap)")
    forgetting_texts: str | None = Field(None, description="a JSONL file of {\"text\": ...} lines for the forgetting probe; "
                                         "unset: the built-in general-knowledge paragraphs")

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be a positive number or auto")
        return v


class PluginRef(BaseModel):
    """``{name: ..., <plugin options>}``; the options are validated against the plugin's Options."""

    model_config = ConfigDict(extra="allow")
    name: str


class Recipe(Section):
    seed: int = Field(42, description="seed for sampling, initialisation and data order")
    output_dir: str | None = Field(None, description="run directory; default runs/<recipe name>")
    model: ModelSection
    dataset: PluginRef
    prompt: PromptSection = PromptSection()
    method: PluginRef
    trainer: PluginRef = PluginRef(name="hf")
    evaluation: EvaluationSection = EvaluationSection()
    exporters: list[PluginRef] = Field(default_factory=lambda: [PluginRef(name="adapter")])


class ResolvedRecipe:
    """A validated recipe with each plugin looked up and its options parsed (once, by validate_recipe)."""

    def __init__(self, recipe: Recipe, host: Host, source: str, raw: dict, options: dict[str, BaseModel]):
        self.recipe = recipe
        self.source = source
        self.raw = raw
        self.dataset = host.datasets.get(recipe.dataset.name)
        self.dataset_options = options["dataset"]
        self.method = host.methods.get(recipe.method.name)
        self.method_options = options["method"]
        self.trainer = host.trainers.get(recipe.trainer.name)
        self.trainer_options = options["trainer"]
        self.exporters = [(host.exporters.get(ref.name), options[f"exporters.{i}"]) for i, ref in enumerate(recipe.exporters)]

    def resolved_dict(self) -> dict:
        """The recipe with every default filled in: what the run really used."""
        d = self.recipe.model_dump(mode="json")
        d["dataset"] = {"name": self.dataset.name, **self.dataset_options.model_dump(mode="json")}
        d["method"] = {"name": self.method.name, **self.method_options.model_dump(mode="json")}
        d["trainer"] = {"name": self.trainer.name, **self.trainer_options.model_dump(mode="json")}
        d["exporters"] = [{"name": p.name, **o.model_dump(mode="json")} for p, o in self.exporters]
        return d


# --- overrides -----------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b=value`` sets a nested key; the value is parsed as YAML (so 8 is an int, null is None)."""
    data = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise PeftbenchError(f"override '{item}' has no '='.", "write overrides as key.sub=value, e.g. method.r=16.")
        key, _, value = item.partition("=")
        _key_parts(key)
        try:
            parsed = load_yaml(value, what=f"override '{item}'") if value.strip() else ""
        except yaml.YAMLError as e:
            raise PeftbenchError(
                f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}).",
                "quote it (key='text') or write a YAML scalar or list, e.g. method.target_modules=[q_proj,v_proj].",
            ) from None
        set_key(data, key, parsed)
    return data


def set_key(data: dict, key: str, value: Any) -> None:
    """Set the nested key ``a.b.0.c`` of ``data`` in place to ``value`` (already parsed)."""
    parts = _key_parts(key)
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        child = node[_index(part, node, key)] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise PeftbenchError(
                f"override '{key}': '{'.'.join(parts[: i + 1])}' is a value, not a section.",
                "override the value itself, or check the key path with `peftbench validate`.",
            )
        node = child
    leaf = parts[-1]
    if isinstance(node, list):
        node[_index(leaf, node, key)] = value
    else:
        node[leaf] = value


def _key_parts(key: str) -> list[str]:
    parts = key.strip().split(".")
    if not all(parts):
        raise PeftbenchError(f"override key '{key}' is malformed.", "write overrides as key.sub=value, e.g. method.r=16.")
    return parts


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise PeftbenchError(
            f"override '{key}': '{part}' is not an index of a list of {len(node)}.", "use 0-based list indices."
        )
    return int(part)


# --- loading and validation ----------------------------------------------------------------------


# A recipe is a few hundred YAML nodes. Nested aliases ("billion laughs": &a [x, x], &b [*a, *a], ...)
# expand a 2 KB file into billions of nodes, which cost seconds and GBs wherever the data is walked
# (validation, run.json): refuse a document whose expansion is larger than this, before building it.
MAX_YAML_NODES = 100_000


def load_yaml(text: str, what: str):
    """yaml.safe_load, refusing documents whose aliases expand past MAX_YAML_NODES."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {})
        except RecursionError:
            size = MAX_YAML_NODES + 1
        if size > MAX_YAML_NODES:
            raise PeftbenchError(f"{what} expands to more than {MAX_YAML_NODES:,} YAML nodes through its aliases (*name).",
                                 "write the values out instead of nesting aliases; a recipe needs a few hundred nodes.")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, memo: dict) -> int:
    """Nodes in the document once every alias is replaced by what it names (shared nodes counted
    each time they are used; computed once per node)."""
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise PeftbenchError(f"recipe file '{path}' {what}.", "pass the path of a YAML recipe, e.g. recipes/quickstart.yaml.")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), what=f"recipe '{path}'")
    except UnicodeDecodeError as e:
        raise PeftbenchError(f"recipe '{path}' is not UTF-8 text (byte {e.start}).", "save the recipe as UTF-8 YAML.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PeftbenchError(f"recipe '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}.", "fix the YAML syntax.") from None
    if not isinstance(data, dict):
        raise PeftbenchError(f"recipe '{path}' must be a YAML mapping of sections.", "start from recipes/quickstart.yaml.")
    return data


def load_recipe(path: str | Path, overrides: list[str] = (), host: Host | None = None) -> ResolvedRecipe:
    from_file = read_recipe_file(path)
    model = from_file.get("model")
    if isinstance(model, dict) and model.get("trust_remote_code"):
        # A recipe may come from someone else; running a model's own Python code is the user's call.
        raise PeftbenchError(
            f"recipe '{path}' sets model.trust_remote_code: a recipe file cannot make peftbench run a model's own code.",
            "remove it from the recipe; if you trust the model's code, say so on the command line: "
            "model.trust_remote_code=true.")
    raw = apply_overrides(from_file, list(overrides))
    resolved = validate_recipe(raw, source=str(path), host=host)
    if resolved.recipe.model.trust_remote_code:
        warn_remote_code(resolved.recipe.model.name)
    return resolved


def warn_remote_code(name: str) -> None:
    """Name the code that trust_remote_code will run, once, before anything is loaded."""
    from peftbench.console import console

    local = Path(name).expanduser()
    files = sorted(p.name for p in local.glob("*.py")) if local.is_dir() else []
    what = f"the Python files in '{name}': {', '.join(files) or 'none found now'}" if local.is_dir() else \
        f"the Python code of hub repo '{name}' (downloaded with the model)"
    console.print(f"[bold yellow]warning:[/] model.trust_remote_code=true: transformers will import and run {what}.")


def validate_recipe(raw: dict, source: str = "<recipe>", host: Host | None = None) -> ResolvedRecipe:
    host = host or get_host()
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems += _describe(e, Recipe, raw)

    # Each plugin's own options, checked even when other sections failed, so one message names all.
    parsed: dict[str, BaseModel] = {}
    sections = [("dataset", host.datasets, raw.get("dataset")), ("method", host.methods, raw.get("method")),
                ("trainer", host.trainers, raw.get("trainer", {"name": "hf"}))]
    exporters = raw.get("exporters", [{"name": "adapter"}])
    if isinstance(exporters, list):
        sections += [(f"exporters.{i}", host.exporters, ref) for i, ref in enumerate(exporters)]
    for where, registry, ref in sections:
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
            continue  # already reported by the section schema above
        if ref["name"] not in registry:
            problems.append(
                f"{where}.name: unknown {registry.kind} '{ref['name']}'.{did_you_mean(ref['name'], registry.names())}"
                f" Known: {', '.join(registry.names())}"
            )
            continue
        options = {k: v for k, v in ref.items() if k != "name"}
        try:
            parsed[where] = registry.get(ref["name"]).Options.model_validate(options)
        except ValidationError as e:
            problems += [f"{where}.{p}" for p in _describe(e, registry.get(ref["name"]).Options, options)]
    problems += _check_paths(raw)
    problems += _check_combinations(raw, host)
    if problems:
        raise _invalid(source, problems)
    return ResolvedRecipe(recipe, host, source, raw, parsed)


def _invalid(source: str, problems: list[str]) -> PeftbenchError:
    text = "; ".join(p.rstrip(".") for p in problems)
    return PeftbenchError(
        f"recipe '{source}' is invalid: {text}" + ("" if text.endswith("?") else "."),
        "correct these keys in the recipe or the key=value overrides (`peftbench validate RECIPE` checks without running).",
    )


def _describe(error: ValidationError, model: type[BaseModel], raw: dict) -> list[str]:
    out = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            fields = _fields_at(model, err["loc"][:-1])
            hint = did_you_mean(str(err["loc"][-1]), fields)
            out.append(f"{loc}: unknown key.{hint}".rstrip("."))
        elif err["type"] == "missing":
            out.append(f"{loc}: required key is missing")
        elif err["type"] in ("model_type", "dict_type"):
            out.append(f"{loc}: must be a section of key: value lines (got {_short(err.get('input'))})")
        else:
            out.append(f"{loc}: {err['msg']} (got {_short(err.get('input'))})")
    return out


def _short(value, limit: int = 60) -> str:
    """A value as the user wrote it, cut short: a whole mis-nested section would drown the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields_at(model: type[BaseModel], loc) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith((".gguf", ".json", ".jsonl", ".csv", ".parquet"))


def _section(raw: dict, key: str) -> dict:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a NUL byte, a name too long for the filesystem, ...
        return False


def _check_paths(raw: dict) -> list[str]:
    from peftbench.pipeline.modeling import resolve_package_file

    problems = []
    name = _section(raw, "model").get("name")
    if not isinstance(name, str):
        pass  # reported by the schema
    elif name.startswith("pkg:"):
        try:
            resolve_package_file(name)
        except PeftbenchError as e:
            problems.append(f"model.name: {e.problem}")
    elif looks_like_path(name) and not _exists(name):
        problems.append(f"model.name: '{name}' does not exist (give a hub id, a model directory or a .gguf file)")
    elif looks_like_path(name) or _exists(name):
        from peftbench.pipeline.modeling import local_model_problem

        problem = local_model_problem(Path(name).expanduser())
        if problem:
            problems.append(f"model.name: {problem}")
    path = _section(raw, "dataset").get("path")
    if isinstance(path, str) and looks_like_path(path) and not _exists(path):
        problems.append(f"dataset.path: '{path}' does not exist")
    texts = _section(raw, "evaluation").get("forgetting_texts")
    if isinstance(texts, str) and not Path(texts).expanduser().is_file():
        problems.append(f"evaluation.forgetting_texts: '{texts}' is not a file (name a JSONL file of {{\"text\": ...}} lines)")
    return problems


def _check_combinations(raw: dict, host: Host) -> list[str]:
    method_name = _section(raw, "method").get("name")
    exporters = raw.get("exporters", [{"name": "adapter"}])
    if not isinstance(method_name, str) or method_name not in host.methods or not isinstance(exporters, list):
        return []  # an unknown or malformed section is reported by the checks above
    problems = []
    caps = host.methods.get(method_name).capabilities
    for i, ref in enumerate(exporters):
        name = ref.get("name") if isinstance(ref, dict) else None
        if not isinstance(name, str) or name not in host.exporters:
            continue
        exporter = host.exporters.get(name)
        missing = exporter.missing_capabilities(caps)
        if missing:
            problems.append(
                f"exporters.{i}: '{exporter.name}' needs a method that is {', '.join(missing)}, "
                f"and '{method_name}' is not (remove this exporter or pick another method)"
            )
        earlier = {r.get("name") for r in exporters[:i] if isinstance(r, dict)}
        absent = [n for n in exporter.after if n not in earlier]
        if absent:
            problems.append(f"exporters.{i}: '{exporter.name}' reads the files of {', '.join(absent)}: "
                            f"list {', '.join(absent)} before it")
    return problems


def prompt_settings(recipe_path: str | None):
    """(PromptSection, max_new_tokens) from a recipe file or a run directory's recipe.yaml; the
    defaults of a recipe without one."""
    if recipe_path is None:
        return PromptSection(), EvaluationSection().max_new_tokens
    path = Path(recipe_path)
    raw = read_recipe_file(path / "recipe.yaml" if path.is_dir() else path)
    try:
        prompt = PromptSection.model_validate(raw.get("prompt") or {})
        evaluation = EvaluationSection.model_validate(raw.get("evaluation") or {})
    except ValidationError as e:
        raise PeftbenchError(f"the prompt/evaluation sections of '{path}' are invalid: {e.errors()[0]['msg']}.",
                             "check them with `peftbench validate`.") from None
    return prompt, evaluation.max_new_tokens
