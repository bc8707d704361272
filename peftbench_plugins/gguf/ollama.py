"""Exporter ``ollama``: a Modelfile beside the GGUF, so ``ollama create NAME -f Modelfile`` runs the
fine-tuned model with the prompt format, stop tokens and sampling it was trained and evaluated with.

Ollama templates are Go text/template, chat templates are Jinja; no converter exists between the
two languages in general. What chat templates have in common is a fixed text around each message
that depends only on its role, a default system block used when the conversation has none, and a
generation prompt. ``template_pieces`` finds those texts by rendering the tokenizer's own template
around sentinel messages, then proves that reassembling them reproduces the template on a set of
conversations; only then is the Go template written from them. A template that does not decompose
(one that trims or rewrites message content, say) gets no TEMPLATE line and a note: Ollama then
picks a template from the chat template stored in the GGUF itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from peftbench.api import ExporterPlugin, ExportResult, Options, StageRefused
from peftbench.kit import build_messages, console, end_of_turn

ROLES = ("system", "user", "assistant")
_SENTINELS = {role: f"\u2063PEFTBENCH_{role.upper()}_{i}\u2063" for i, role in enumerate(ROLES + ("user2",))}


class TemplateNotExpressible(Exception):
    """The chat template is not 'fixed text around each message': no faithful Go template."""


@dataclass(frozen=True)
class TemplatePieces:
    """A chat template as fixed texts. A conversation renders as: ``no_system_head`` unless it opens
    with a system message, then for each message ``prefix[role] + content + suffix[role]`` (a
    system message uses ``system_head`` as its prefix), then ``generation_prompt`` unless the last
    message is the assistant's."""

    system_head: str
    no_system_head: str
    prefix: dict[str, str]  # user and assistant
    suffix: dict[str, str]  # every role
    generation_prompt: str

    def render(self, messages: list[dict]) -> str:
        """What the Go template renders, in Python: the proof that the pieces are the template."""
        out = [] if messages and messages[0]["role"] == "system" else [self.no_system_head]
        for m in messages:
            out += [self.system_head if m["role"] == "system" else self.prefix[m["role"]], m["content"], self.suffix[m["role"]]]
        if not messages or messages[-1]["role"] != "assistant":
            out.append(self.generation_prompt)
        return "".join(out)


def _split_after(text: str, marker: str) -> tuple[str, str]:
    """(up to and including ``marker`` and the whitespace after it, the rest)."""
    i = text.find(marker)
    if not marker or i < 0:
        raise TemplateNotExpressible(f"no end-of-turn token {marker!r} between two messages")
    cut = i + len(marker)
    while cut < len(text) and text[cut] in " \n":
        cut += 1
    return text[:cut], text[cut:]


def _between(text: str, a: str, b: str) -> str:
    start = text.index(a) + len(a)
    return text[start:text.index(b, start)]


PROBE_CONTENT = ("Amanda: I baked cookies. Do you want some?\nJerry: Sure!", "Amanda baked cookies for Jerry.",
                 "You summarise dialogues.")


def probe_conversations() -> list[list[dict]]:
    """Conversations the pieces must reproduce: with and without a system message, one and several
    turns, ending with the user (inference: generation prompt) or the assistant (training)."""
    dialogue, summary, system = PROBE_CONTENT
    user, assistant = {"role": "user", "content": dialogue}, {"role": "assistant", "content": summary}
    sys_msg = {"role": "system", "content": system}
    return [[user], [sys_msg, user], [user, assistant], [sys_msg, user, assistant],
            [user, assistant, user], [sys_msg, user, assistant, user]]


def template_pieces(tokenizer) -> TemplatePieces:
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    s = _SENTINELS
    eot = end_of_turn(tokenizer)[1]
    try:
        full = render([{"role": "system", "content": s["system"]}, {"role": "user", "content": s["user"]},
                       {"role": "assistant", "content": s["assistant"]}, {"role": "user", "content": s["user2"]}], True)
        one_user = render([{"role": "user", "content": s["user"]}], False)
        system_suffix, user_prefix = _split_after(_between(full, s["system"], s["user"]), eot)
        user_suffix, assistant_prefix = _split_after(_between(full, s["user"], s["assistant"]), eot)
        assistant_suffix, user_prefix_again = _split_after(_between(full, s["assistant"], s["user2"]), eot)
        tail = full[full.index(s["user2"]) + len(s["user2"]):]
        head_before_user = one_user[:one_user.index(s["user"])]
    except ValueError as e:  # a sentinel went missing: the template rewrites content
        raise TemplateNotExpressible(f"the template does not copy message content verbatim ({e})") from None
    if user_prefix_again != user_prefix or not tail.startswith(user_suffix) or not head_before_user.endswith(user_prefix):
        raise TemplateNotExpressible("the text around a message depends on more than its role")
    pieces = TemplatePieces(
        system_head=full[:full.index(s["system"])],
        no_system_head=head_before_user[:len(head_before_user) - len(user_prefix)],
        prefix={"user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        generation_prompt=tail[len(user_suffix):],
    )
    for conversation in probe_conversations():
        expected = render(conversation, conversation[-1]["role"] != "assistant")
        if pieces.render(conversation) != expected:
            raise TemplateNotExpressible(f"reassembled pieces differ from the template for roles "
                                         f"{[m['role'] for m in conversation]}")
    return pieces


def _go_text(text: str) -> str:
    """Literal text in a Go template; text holding '{{' goes in as a quoted Go string."""
    if "{{" not in text:
        return text
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # JSON escapes are valid Go string escapes


def go_template(p: TemplatePieces) -> str:
    """The Ollama TEMPLATE (Go text/template over .Messages) equivalent to ``p.render``. One line
    of actions: whitespace between actions would be output, and trim markers would eat the
    newlines that belong to the pieces."""
    t = _go_text
    return (
        '{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}' + t(p.no_system_head) + "{{ end }}"
        + '{{ $last := "" }}{{ range .Messages }}'
        + '{{ if eq .Role "system" }}' + t(p.system_head) + "{{ .Content }}" + t(p.suffix["system"])
        + '{{ else if eq .Role "user" }}' + t(p.prefix["user"]) + "{{ .Content }}" + t(p.suffix["user"])
        + '{{ else if eq .Role "assistant" }}' + t(p.prefix["assistant"]) + "{{ .Content }}" + t(p.suffix["assistant"])
        + "{{ end }}{{ $last = .Role }}{{ end }}"
        + '{{ if ne $last "assistant" }}' + t(p.generation_prompt) + "{{ end }}"
    )


def stop_tokens(tokenizer) -> list[str]:
    """End-of-turn token first, then eos if it differs: where generation must stop."""
    stops = [end_of_turn(tokenizer)[1]]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


class OllamaOptions(Options):
    temperature: float | None = Field(None, ge=0, description="sampling temperature; None: the model's generation_config.json, else 0 (greedy, as peftbench evaluated it)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; None: the model's generation_config.json, else Ollama's default")
    top_k: int | None = Field(None, gt=0, description="top-k sampling; None: the model's generation_config.json, else Ollama's default")
    repeat_penalty: float | None = Field(None, gt=0, description="repetition penalty; None: the model's generation_config.json, else Ollama's default")
    num_ctx: int | None = Field(None, gt=0, description="context window Ollama allocates; None: Ollama's default")
    live_check: bool = Field(True, description="when an `ollama` binary is on PATH, create the model and run one prompt")


def sampling_parameters(options: OllamaOptions, generation_config: dict) -> dict[str, float | int]:
    """Options first, then what the model's authors recommend in generation_config.json."""
    sampled = generation_config.get("do_sample", False)
    params = {
        "temperature": options.temperature if options.temperature is not None
        else generation_config.get("temperature", 0.0) if sampled else 0.0,
        "top_p": options.top_p if options.top_p is not None else generation_config.get("top_p") if sampled else None,
        "top_k": options.top_k if options.top_k is not None else generation_config.get("top_k") if sampled else None,
        "repeat_penalty": options.repeat_penalty if options.repeat_penalty is not None
        else generation_config.get("repetition_penalty"),
        "num_ctx": options.num_ctx,
    }
    return {k: v for k, v in params.items() if v is not None}


def modelfile_text(gguf_name: str, tokenizer, prompt, parameters: dict) -> tuple[str, dict]:
    """The Modelfile and what went into it (for run.json)."""
    lines = [f"# Written by peftbench. Prompt the model as it was trained: {prompt.template!r}", f"FROM ./{gguf_name}"]
    info: dict = {}
    try:
        template = go_template(template_pieces(tokenizer))
        if '"""' in template:
            raise TemplateNotExpressible('the template contains """, which a Modelfile cannot quote')
        lines.append(f'TEMPLATE """{template}"""')
        info["template"] = "from the tokenizer's chat template"
    except TemplateNotExpressible as e:
        info["template"] = f"left to Ollama (reads the GGUF's chat template): {e}"
        console.print(f"[yellow]note:[/] no TEMPLATE in the Modelfile: {e}")
    if prompt.system:
        lines.append(f'SYSTEM """{prompt.system}"""')
    stops = stop_tokens(tokenizer)
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in parameters.items()]
    info.update(stop=stops, parameters=parameters)
    return "\n".join(lines) + "\n", info


class OllamaExporter(ExporterPlugin):
    """A Modelfile beside the gguf exporter's file (listed after it in the recipe)."""

    name = "ollama"
    Options = OllamaOptions
    requires = ("mergeable",)  # llama.cpp converts the standard checkpoint a merge leaves
    after = ("gguf",)

    def estimated_bytes(self, options: OllamaOptions, ctx) -> int:
        return 0  # a few lines of text beside the GGUF

    def export(self, options: OllamaOptions, ctx) -> ExportResult:
        previous = ctx.exports.get("gguf")
        gguf = previous.files.get("gguf") if previous else None
        if not gguf or not Path(gguf).is_file():
            raise StageRefused("the ollama exporter needs the GGUF, and the gguf exporter wrote none in this run.",
                               "list the gguf exporter before ollama and check why it failed (run.json, stage export:gguf).")
        gguf = Path(gguf)
        generation_config = {}
        config_file = Path(previous.info.get("merged_from", "")) / "generation_config.json"
        if config_file.is_file():
            generation_config = json.loads(config_file.read_text(encoding="utf-8"))
        text, info = modelfile_text(gguf.name, ctx.tokenizer, ctx.recipe.recipe.prompt,
                                    sampling_parameters(options, generation_config))
        modelfile = gguf.parent / "Modelfile"
        modelfile.write_text(text, encoding="utf-8")
        console.print(f"wrote {modelfile} (ollama create NAME -f {modelfile})")
        if options.live_check:
            start = time.perf_counter()
            example = ctx.eval_dataset[0]["dialogue"] if ctx.eval_dataset is not None else PROBE_CONTENT[0]
            status, detail = ollama_live_check(modelfile, user_message(ctx.recipe.recipe.prompt, example))
            info["live_check"] = {"status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}
            console.print(f"ollama live check {status}: {detail}")
        problems = [f"ollama live check failed: {info['live_check']['detail']}"] \
            if info.get("live_check", {}).get("status") == "failed" else []
        return ExportResult(files={"modelfile": str(modelfile)}, sizes={"modelfile": modelfile.stat().st_size},
                            info=info, problems=problems)


# --- the live check ----------------------------------------------------------------------------


def ollama_live_check(modelfile: Path, prompt_text: str, timeout_s: int = 600) -> tuple[str, str]:
    """``ollama create`` from the Modelfile, one prompt, ``ollama rm``: (status, detail) with status
    ``passed``, ``failed`` or ``skipped``."""
    binary = shutil.which("ollama")
    if binary is None:
        return "skipped", "no `ollama` binary on PATH (install Ollama to run the model in it)"
    if not modelfile.is_file():
        return "skipped", f"no Modelfile at {modelfile} (the ollama exporter writes one beside the GGUF)"
    name = f"peftbench-smoke-{os.getpid()}"
    try:
        create = subprocess.run([binary, "create", name, "-f", str(modelfile)], capture_output=True, text=True,
                                timeout=timeout_s, cwd=modelfile.parent)
        if create.returncode != 0:
            return "failed", f"ollama create failed: {_last_line(create.stderr or create.stdout)}"
        run = subprocess.run([binary, "run", name, prompt_text], capture_output=True, text=True, timeout=timeout_s)
        if run.returncode != 0:
            return "failed", f"ollama run failed: {_last_line(run.stderr or run.stdout)}"
        answer = run.stdout.strip()
        if not answer:
            return "failed", "ollama run answered nothing"
        return "passed", answer
    except subprocess.TimeoutExpired as e:
        return "failed", f"ollama timed out after {e.timeout} s"
    finally:
        subprocess.run([binary, "rm", name], capture_output=True, text=True, timeout=60)


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def user_message(prompt, dialogue: str) -> str:
    """The user turn as trained (what to type into `ollama run`)."""
    return build_messages(prompt, dialogue)[-1]["content"]
