"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class DemeError(Exception):
    """Bad input or an unmeetable request, with a message that says how to fix it."""


class ConfigError(DemeError):
    """The experiment config (file, --set override or derived value) is invalid."""
