"""Library noise a user cannot act on stays out of the terminal and goes to the run's log (issue 16)."""

import subprocess
import sys

import yaml

from peftbench.testing import tiny_recipe

NOISE = ("Loading weights", "Writing model shards", "Generating train split", "kernels-community")


def test_a_run_prints_no_library_noise_and_logs_it(tmp_path, tiny_model_dir, tiny_data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "qlora", "r": 2},
                                                 trainer={"max_steps": 1}, evaluation={"max_samples": 1, "max_new_tokens": 2})))
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "peftbench", "run", str(recipe), "--output-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "PEFTBENCH_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    terminal = done.stdout + done.stderr
    assert not [n for n in NOISE if n in terminal], [n for n in NOISE if n in terminal]
    assert "Run written to" in done.stdout  # peftbench's own output stays
    log = (run_dir / "run.log").read_text()
    assert " WARNING " in log or " INFO " in log  # what the libraries said is kept, with its logger's name
