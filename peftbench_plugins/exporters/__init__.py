"""The built-in exporter plugins, one module each (gguf and ollama live in the plugin package peftbench_plugins.gguf)."""
