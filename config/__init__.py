"""Settings for every dicom-triage process, read once into one typed object."""

from config.settings import (
    DEFAULT_ROUTING_RULES,
    ConfigError,
    Destination,
    RoutingRule,
    Settings,
    load_settings,
)

__all__ = ["DEFAULT_ROUTING_RULES", "ConfigError", "Destination", "RoutingRule", "Settings", "load_settings"]
