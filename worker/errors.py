"""Errors the ``dicom-triage`` command reports as one clear line instead of a traceback."""


class StartupError(RuntimeError):
    """A process cannot start: its port is taken, its data directory unusable, its database unreachable."""
