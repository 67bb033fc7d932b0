"""Error kinds that decide how the command line reports a failure (see ``peftkit.cli.errors``).

``SettingsError`` is a ``ValueError`` (so API callers catching ``ValueError`` keep working) raised when the settings
themselves are wrong: a flag or config value out of range, of the wrong type, or in conflict with another. The CLI
exits with status 2 for it, as argparse does for a malformed command line; every other user error exits with 1.
"""

from __future__ import annotations


class SettingsError(ValueError):
    """The settings are wrong (not a file, the data or the machine): fix the command line or the config file."""
