"""Data-parallel training through accelerate: two processes on the CPU (gloo) against one.

Two processes must write the run directory once (one record, one report, one set of predictions),
record the processes and the global batch, and train like one process given the same global batch:
the same examples in every step, hence the same token count, and the same losses within noise.
The method is QLoRA, the case that matters most (4-bit weights go through DDP's start-up broadcast);
LoRA takes the same path without the quantisation.
"""

import subprocess
import sys

import pytest
import yaml

from peftbench.cli import main
from peftbench.files import read_json
from peftbench.testing import read_jsonl, tiny_recipe

GLOBAL_BATCH = 8
LAUNCH_TIMEOUT_S = 300  # a hang at a barrier fails the test instead of stalling CI


def write_recipe(path, model_dir, data_dir, batch_size: int):
    # Dropout off and a learning rate that moves the loss within four steps, so that the two runs'
    # losses can be compared step by step.
    recipe = tiny_recipe(model_dir, data_dir, {"name": "qlora", "r": 4, "dropout": 0.0},
                         trainer={"batch_size": batch_size, "grad_accum": 1, "learning_rate": 1e-2, "max_steps": 4})
    path.write_text(yaml.safe_dump(recipe))
    return path


def peftbench_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftbench", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """The same recipe and global batch: 1 process x 8 examples, and 2 processes x 4 examples."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'peftbench[quant]')")
    root = tmp_path_factory.mktemp("distributed")
    one = write_recipe(root / "one.yaml", tiny_model_dir, tiny_data_dir, batch_size=GLOBAL_BATCH)
    assert main(["run", str(one), "--output-dir", str(root / "one" / "run")]) == 0

    two = write_recipe(root / "two.yaml", tiny_model_dir, tiny_data_dir, batch_size=GLOBAL_BATCH // 2)
    launched = peftbench_run(two, "--num-processes", 2, "--output-dir", root / "two" / "run")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    return {"root": root, "one": root / "one" / "run", "two": root / "two" / "run", "launched": launched,
            "two_recipe": two}


def test_two_processes_write_one_run_directory(runs):
    run_dir = runs["two"]
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"run.json", "report.md", "recipe.yaml", "run.log", "predictions_baseline.jsonl",
                     "predictions_finetuned.jsonl", "adapter", "checkpoints"}, names  # no stray temporary files
    for which in ("baseline", "finetuned"):
        assert len(read_jsonl(run_dir / f"predictions_{which}.jsonl")) == 4  # written once, not appended twice
    assert runs["launched"].stdout.count("Run written to") == 1  # the other process says nothing
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "success"
    assert "over 2 process(es)" in (run_dir / "report.md").read_text()


def test_record_states_processes_and_global_batch(runs):
    one, two = (read_json(runs[k] / "run.json") for k in ("one", "two"))
    assert (one["train_info"]["num_processes"], two["train_info"]["num_processes"]) == (1, 2)
    assert one["train_info"]["global_batch_size"] == two["train_info"]["global_batch_size"] == GLOBAL_BATCH
    # Same result format: the same keys everywhere, the same stages.
    assert set(one["train_info"]) == set(two["train_info"])
    assert set(one["meta_info"]) == set(two["meta_info"])
    for which in ("baseline", "finetuned"):
        assert set(one["eval"][which]) == set(two["eval"][which])
        assert one["eval"][which]["n"] == two["eval"][which]["n"] == 4
    assert list(one["run_info"]["stages"]) == list(two["run_info"]["stages"])
    assert all(st["status"] == "success" for st in two["run_info"]["stages"].values())


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    one, two = (read_json(runs[k] / "run.json")["train_info"] for k in ("one", "two"))
    assert one["steps"] == two["steps"] == 4
    # Four steps of 8 over 16 rows are two whole epochs: the same tokens whatever the order, so an
    # equal count shows the second process's tokens are counted too.
    assert one["tokens_seen"] == two["tokens_seen"] > 0
    losses_one = [m["loss"] for m in one["metrics"] if "loss" in m]
    losses_two = [m["loss"] for m in two["metrics"] if "loss" in m]
    assert len(losses_one) == len(losses_two) == 4
    assert losses_one[0] - losses_one[-1] > 0.02, "the loss must move for the comparison to mean anything"
    assert losses_two == pytest.approx(losses_one, abs=5e-3), (losses_one, losses_two)


def test_a_taken_run_directory_stops_every_process_with_one_message(runs):
    """accelerate launch directly (no shortcut): the main process decides, and all processes stop."""
    before = (runs["two"] / "run.json").read_text()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
               "-m", "peftbench", "run", str(runs["two_recipe"]), "--output-dir", str(runs["two"])]
    launched = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert launched.returncode != 0
    assert launched.stdout.count("holds a finished run") == 1, launched.stdout + launched.stderr[-3000:]
    assert (runs["two"] / "run.json").read_text() == before


def test_the_shortcut_refuses_a_taken_run_directory_before_launching(runs, capsys):
    before = (runs["two"] / "run.json").read_text()
    assert main(["run", str(runs["two_recipe"]), "--num-processes", "2", "--output-dir", str(runs["two"])]) == 2
    assert "holds a finished run" in capsys.readouterr().out
    assert (runs["two"] / "run.json").read_text() == before
