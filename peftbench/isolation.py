"""Native code that may crash (llama.cpp) runs in a child process.

A segmentation fault inside llama.cpp kills the process it happens in, with no Python exception and
no message. Run there, it would take a whole `peftbench run` down with it, scores and all. In a child
it becomes a ``NativeCrash``: one line naming the signal and the fix, which the caller records as a
failed check while the run goes on.

The child is started with ``spawn`` (a fresh interpreter): forking a process that has started
torch's or llama.cpp's threads can deadlock.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from typing import Any, Callable

from peftbench.errors import PeftbenchError


class NativeCrash(PeftbenchError):
    """The child process died from a signal (or exited without a result)."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode} without a result"


def _child(target: Callable, args: tuple, kwargs: dict, pipe) -> None:
    # Messages go through a pipe, written synchronously: a multiprocessing.Queue writes from a
    # feeder thread, and what it holds is lost when the process dies from a signal.
    def progress(n: int = 1) -> None:
        pipe.send(("progress", n))

    try:
        result = target(*args, progress=progress, **kwargs)
    except PeftbenchError as e:
        pipe.send(("error", (e.problem, e.fix)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as one line
        pipe.send(("crash", f"{type(e).__name__}: {e}".strip() + "\n" + traceback.format_exc(limit=5)))
    else:
        pipe.send(("result", result))
    pipe.close()


def run_isolated(target: Callable, *args, what: str, fix: str, progress: Callable[[int], None] | None = None,
                 **kwargs) -> Any:
    """``target(*args, progress=callback, **kwargs)`` in a child process; its return value here.

    ``target`` must be a module-level function (the child imports it) whose arguments and result
    pickle. Its ``progress(n)`` calls reach ``progress`` here. A PeftbenchError in the child is raised
    again here; a signal or any other death raises ``NativeCrash`` naming ``what`` and ``fix``."""
    return run_isolated_side_by_side(target, [args], what=what, fix=fix, progress=progress, **kwargs)[0]


def run_isolated_side_by_side(target: Callable, arg_lists: list[tuple], *, what: str, fix: str,
                              progress: Callable[[int], None] | None = None, **kwargs) -> list[Any]:
    """``run_isolated`` for several argument tuples at once, one child process each, all running
    together; their return values in the same order. The first child to fail (an error, a signal)
    stops the others, and its failure is raised here."""
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    children = []  # (process, reader)
    finished = False
    try:
        for args in arg_lists:
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(target, args, kwargs, writer), daemon=True)
            process.start()
            writer.close()  # the child holds the only writing end: its death shows here as end of file
            children.append((process, reader))
        results: dict[int, Any] = {}
        readers = {reader: index for index, (_, reader) in enumerate(children)}
        while len(results) < len(children):
            for reader in wait([r for r, index in readers.items() if index not in results]):
                index = readers[reader]
                process = children[index][0]
                try:
                    kind, payload = reader.recv()
                except EOFError:
                    process.join()
                    raise NativeCrash(f"{what} {describe_exit(process.exitcode)} (a crash in native code).", fix) from None
                if kind == "progress":
                    if progress is not None:
                        progress(payload)
                elif kind == "result":
                    results[index] = payload
                elif kind == "error":
                    problem, error_fix = payload
                    raise PeftbenchError(problem, error_fix)
                else:
                    raise NativeCrash(f"{what} failed: {payload.splitlines()[0]}", fix)
        finished = True
        return [results[index] for index in range(len(children))]
    finally:
        for process, reader in children:
            reader.close()
            if finished:
                process.join(timeout=5)
            if process.is_alive():  # interrupted (Ctrl-C), an error here or in a sibling: do not leave it running
                process.kill()
            process.join()
