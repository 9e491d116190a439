"""A fake ComfyUI server that behaves like the recorded ComfyUI 0.12.1, message for message.

async with run_simulator(SimulatorConfig(node_seconds=0.1)) as sim:
    ...  # talk to sim.url / sim.ws_url; sim.crash(), sim.set_hang(), sim.drop_websockets()
"""

from .config import SimulatorConfig, load_config
from .server import Simulator, run_simulator, serve

__all__ = ["Simulator", "SimulatorConfig", "load_config", "run_simulator", "serve"]
