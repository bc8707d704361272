"""The built-in method plugins, one module each."""
