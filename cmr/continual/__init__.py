"""Continual learning: replay storage, checkpoint anchoring, typed hooks and the learner loop."""

from cmr.continual.anchoring import Anchor, AnchorConfig
from cmr.continual.hooks import BaseHooks, LearnerHooks, RecordingHooks
from cmr.continual.replay import CoresetBuffer, Interactions, ReplayBuffer, ReservoirBuffer

__all__ = [
    "Anchor", "AnchorConfig", "BaseHooks", "LearnerHooks", "RecordingHooks",
    "CoresetBuffer", "Interactions", "ReplayBuffer", "ReservoirBuffer",
]
