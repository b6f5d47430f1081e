"""`prfaas simulate`: a discrete-event simulator (SimPy) of a whole PrfaaS deployment whose routing,
threshold loop and P/D rebalancing are the router's own functions driven by the simulated clock.
Model and sources: docs/simulator.md."""

from prfaas_plugin.sim.config import SimConfigError, SimulationSpec, load_simulation
from prfaas_plugin.sim.model import DeploymentResult, simulate_deployment
from prfaas_plugin.sim.run import run_all

__all__ = [
    "DeploymentResult",
    "SimConfigError",
    "SimulationSpec",
    "load_simulation",
    "run_all",
    "simulate_deployment",
]
