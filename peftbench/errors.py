"""The one error type users see: a problem and its fix, printed as one line by the CLI."""

import difflib


def did_you_mean(name: str, choices) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


class PeftbenchError(Exception):
    """A problem the user can fix. The CLI prints it without a traceback and exits with code 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


class StageRefused(PeftbenchError):
    """A stage declines to run for this configuration (e.g. GGUF export of a non-mergeable method)."""


# Set by a parent process (a comparison runs each run as `peftbench run` in a child): where the child
# writes its one-line error, since a run that fails on its input leaves no run directory to read it from.
ERROR_FILE_ENV = "PEFTBENCH_ERROR_FILE"
