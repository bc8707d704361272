"""pytest plugin for plugin authors (fixtures and a conformance suite)."""
