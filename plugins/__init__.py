"""Built-in analysis plugins, one module per kernel structure, registered in the order of
``collector.plugins.BUILTIN_PLUGINS``."""
