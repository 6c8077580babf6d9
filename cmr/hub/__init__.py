"""The model hub: versioned registry of model cards, persisted in SQLite or PostgreSQL."""

from cmr.hub.hub import HubChange, ModelHub
from cmr.hub.store import HubStore, HubStoreProtocol, PgHubStore, open_hub_store

__all__ = ["HubChange", "ModelHub", "HubStore", "HubStoreProtocol", "PgHubStore", "open_hub_store"]
