"""Distributed speculative inference (DSI, Timor et al.): the latency simulator
(:mod:`~sequoia.dsi.simulator`), the paper's settings (:mod:`~sequoia.dsi.paper`), worker pools
(:mod:`~sequoia.dsi.pool`), the orchestrator (:mod:`~sequoia.dsi.orchestrator`) and its check
against the simulator (:mod:`~sequoia.dsi.check`)."""
