"""peftbench: fine-tune chat LLMs with parameter-efficient methods and compare them honestly."""

__version__ = "0.1.0"
