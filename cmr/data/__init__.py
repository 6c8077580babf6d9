"""Loaders for the shared data formats (see ``../shared/data/README.md``)."""

from cmr.data.cmrbench import CMRBench, Experience, load_cmrbench
from cmr.data.examples import Examples
from cmr.data.outcomes import OutcomeData, load_outcomes

__all__ = ["CMRBench", "Experience", "Examples", "OutcomeData", "load_cmrbench", "load_outcomes"]
