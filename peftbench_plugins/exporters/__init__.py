"""The built-in exporter plugins, one module each (gguf and ollama share llama.cpp checks from peftbench.smoke)."""
