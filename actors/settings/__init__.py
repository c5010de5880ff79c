"""Settings: ``config.toml`` defaults, overridden by ``.env``, overridden by the process environment.

- ``sections.py``: what the settings are: one frozen section per ``config.toml`` table, held by
  :class:`Settings`; which are secret, which an instance may override.
- ``fields.py``: how a setting is declared and checked (:class:`ConfigError`, one line naming the variable).
- ``loading.py``: reading ``config.toml``, ``.env`` and the environment into :class:`Settings`.
- ``instances.py``: the instances file: each Evolution instance's own :class:`Settings`.
"""

from .fields import ConfigError
from .instances import configured_instances, instances_path, load_instances
from .loading import DEFAULT_CONFIG_FILE, PROJECT_ROOT, load_settings, read_dotenv
from .sections import (PROVIDERS, SECTIONS, ConversationSettings, CRMSettings, LLMSettings, LoggingSettings,
                       OutboundSettings, SecuritySettings, ServerSettings, Settings, StorageSettings,
                       setting_fields)

__all__ = [
    "ConfigError", "DEFAULT_CONFIG_FILE", "PROJECT_ROOT", "load_settings", "read_dotenv", "PROVIDERS",
    "configured_instances", "instances_path", "load_instances",
    "SECTIONS", "ConversationSettings", "CRMSettings", "LLMSettings", "LoggingSettings", "OutboundSettings",
    "SecuritySettings", "ServerSettings", "Settings", "StorageSettings", "setting_fields",
]
