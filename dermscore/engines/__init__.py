"""Engines other than the local one (``dermscore.infer.score``), chosen with ``dermscore run --engine``.

Importing this package stays cheap: an engine's module imports its framework (Ray) only when a run
asks for that engine, so the local engine never pays for, or needs, the optional extra.
"""

from __future__ import annotations

from dataclasses import dataclass

from dermscore.errors import DermscoreError, UsageError

ENGINES = ("local", "ray")


class EngineError(DermscoreError):
    """The engine itself failed (cluster unreachable, workers lost past their retries), not one input."""

    exit_code = 1


@dataclass(frozen=True)
class RayOptions:
    """Where and with what resources the Ray engine runs; checked here so bad values fail before any work."""

    address: str | None = None  # None: $RAY_ADDRESS if set, else a local Ray instance on this machine
    replicas: int = 1  # model actors, each holding the whole ensemble
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise UsageError(f"--replicas must be at least 1, got {self.replicas}.")
        if self.gpus_per_replica < 0:
            raise UsageError(f"--gpus-per-replica must be 0 or more, got {self.gpus_per_replica}.")
        if self.cpus_per_replica <= 0:
            raise UsageError(f"--cpus-per-replica must be more than 0, got {self.cpus_per_replica}.")

    @property
    def device(self) -> str:
        """What each replica computes on, for the default batch size (dermscore.runtime)."""
        return "gpu" if self.gpus_per_replica > 0 else "cpu"
