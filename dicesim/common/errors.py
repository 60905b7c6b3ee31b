class ConfigError(ValueError):
    """An invalid setting. Raised before training; the CLI prints it as one line and exits 2."""
