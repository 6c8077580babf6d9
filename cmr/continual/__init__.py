"""Continual learning: replay storage, checkpoint anchoring, typed hooks and the learner loop."""

from cmr.continual.anchoring import Anchor, AnchorConfig
from cmr.continual.hooks import LearnerHooks, RecordingHooks
from cmr.continual.replay import CoresetBuffer, Interactions, Replay, ReplayBuffer, ReservoirBuffer

__all__ = [
    "Anchor", "AnchorConfig", "LearnerHooks", "RecordingHooks",
    "CoresetBuffer", "Interactions", "Replay", "ReplayBuffer", "ReservoirBuffer",
]
