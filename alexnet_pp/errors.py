"""The project's one error for settings that cannot run (kept apart so every module may raise it)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""
