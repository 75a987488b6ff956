"""Simulated time and a seeded lossy network for driving the real protocol objects."""

from mcastdeploy.sim.harness import Simulation, SimResult
from mcastdeploy.sim.network import BurstLoss, GroupLossModel, LossModel

__all__ = ["BurstLoss", "GroupLossModel", "LossModel", "SimResult", "Simulation"]
