"""Settings for every dicom-triage process, read once into one typed object."""

from config.settings import (
    ConfigError,
    Destination,
    RoutingRule,
    Settings,
    load_settings,
)

__all__ = ["ConfigError", "Destination", "RoutingRule", "Settings", "load_settings"]
