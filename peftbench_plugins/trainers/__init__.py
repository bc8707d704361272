"""The built-in trainer plugin (hf) and the packing engine only it uses."""
