"""The model hub: versioned registry of model cards, persisted in SQLite."""

from cmr.hub.hub import HubChange, ModelHub
from cmr.hub.store import HubStore

__all__ = ["HubChange", "ModelHub", "HubStore"]
