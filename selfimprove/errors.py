"""The error type of a config problem, in a module of its own: the config check calls into the backends
and the samplers, which raise it too, so neither side imports the other for it."""


class ConfigError(ValueError):
    """A config problem found before the run starts; the message names the key."""
