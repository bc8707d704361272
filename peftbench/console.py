"""One rich console for the whole tool (progress bars and tables share it)."""

from rich.console import Console

console = Console(highlight=False)
