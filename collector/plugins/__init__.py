"""Built-in analysis plugins, one module per kernel structure, registered in the order of
``collector.plugin_manager.BUILTIN_PLUGINS``."""
