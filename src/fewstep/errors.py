"""The one base class of the errors a user can fix (bad params, data, environment, lineage).

Entry points (stages, the launcher, flows) turn a :class:`UserError` into one clear line and exit
code 2; anything else is a bug and keeps its traceback. Every such error of the library subclasses
it (``ParamsError``, ``DataError``, ``StorageError``, ``TrainingDivergedError``, ``DistError``,
``LineageError``, ``SettingsError``, ``LaunchError``, ...), so no code raises ``FileNotFoundError``
just to get exit code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure with a message that tells the user what to change."""
