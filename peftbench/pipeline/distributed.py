"""Data-parallel runs: ``accelerate launch -m peftbench run RECIPE`` starts one process per GPU.

Every process loads the model on its own device and trains; the transformers Trainer wraps the model
in DDP and gives each process its share of every batch. Everything that reads or writes the run
directory (its checks, the evaluations, the adapter, exports, run.json, the report) happens once, on
the main process, while the others wait. A single process never touches torch.distributed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from peftbench.errors import PeftbenchError

# The other processes wait while the main process evaluates and exports, which can take far longer
# than any training collective. They wait on a gloo group of their own, so this long timeout never
# delays noticing a hung NCCL collective during training.
WAIT_TIMEOUT = timedelta(hours=6)
# The Trainer's ddp_timeout default, which it would have used had it started the process group.
TRAIN_TIMEOUT = timedelta(minutes=30)


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Processes:
    """This process's place among the run's processes."""

    num_processes: int = 1
    index: int = 0
    wait_group: Any = None  # gloo group used only for waiting on the main process

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            import torch.distributed as dist

            dist.barrier(group=self.wait_group)

    @contextmanager
    def main_first(self):
        """The main process runs the block first (filling the dataset and model caches), then the
        others, which find the caches filled instead of writing them at the same time."""
        if not self.is_main:
            self.wait_for_everyone()
        yield
        if self.is_main:
            self.wait_for_everyone()

    def on_main(self, fn, *args, **kwargs) -> None:
        """Run ``fn`` on the main process only. A PeftbenchError it raises is raised on every process,
        so all of them stop on the same decision instead of some waiting for ever."""
        if self.num_processes == 1:
            fn(*args, **kwargs)
            return
        import torch.distributed as dist

        error = [None]
        if self.is_main:
            try:
                fn(*args, **kwargs)
            except PeftbenchError as e:
                error = [e]
        dist.broadcast_object_list(error, src=0, group=self.wait_group)
        if error[0] is not None:
            raise error[0]

    def close(self) -> None:
        """Wait until the main process has finished writing, then leave the process group."""
        if self.num_processes > 1:
            import torch.distributed as dist

            self.wait_for_everyone()
            dist.destroy_process_group()


def start(device: str) -> Processes:
    """Join the processes a launcher started; a no-op for a single process."""
    if launched_processes() == 1:
        return Processes()
    if device not in ("cuda", "cpu"):
        raise PeftbenchError(f"several processes were launched on {device}, which cannot train data-parallel.",
                             "launch one process, or use CUDA GPUs or the CPU.")
    import torch.distributed as dist
    from accelerate import PartialState

    from peftbench.console import console

    # PartialState starts the process group (NCCL on GPUs, gloo on the CPU) and binds this process to
    # its GPU; the Trainer's own PartialState later finds both and reuses them.
    state = PartialState(cpu=device == "cpu", timeout=TRAIN_TIMEOUT)
    wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    if not state.is_main_process:  # one copy of every message and progress bar: the main process's
        import datasets
        import transformers

        console.quiet = True
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return Processes(num_processes=state.num_processes, index=state.process_index, wait_group=wait_group)


def launch(num_processes: int, peftbench_args: list[str]) -> int:
    """Run ``peftbench ARGS`` in ``num_processes`` processes through accelerate's own launcher and
    return its exit status."""
    from peftbench.pipeline.device import detect_device

    env = dict(os.environ)
    device = detect_device()
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < num_processes:
            raise PeftbenchError(f"--num-processes {num_processes} needs {num_processes} GPUs; {torch.cuda.device_count()} are visible.",
                                 f"pass --num-processes {torch.cuda.device_count()} or fewer, or set CUDA_VISIBLE_DEVICES.")
    elif device == "cpu":
        # accelerate's --cpu starts a single process unless MPI is set up; --multi_gpu starts them
        # through torchrun, and ACCELERATE_USE_CPU makes them join over gloo instead of NCCL.
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        raise PeftbenchError(f"--num-processes needs CUDA GPUs or the CPU, not {device}.", "drop --num-processes.")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={num_processes}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
               "--main_process_port=0",  # a free port: several runs can share a machine
               "-m", "peftbench", *peftbench_args]
    return subprocess.call(command, env=env)
