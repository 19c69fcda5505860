"""A local App Store Connect stand-in (Xcode Cloud endpoints) for the demo, tests and benchmarks.

Public API:

- `Simulator(scenario, clock, rate_limit)`: the state (world, keys, runs, faults, traffic) and
  `app()`, the aiohttp application serving Apple's paths plus the `/_sim/` admin API.
- `running_simulator(...)`: async context manager serving one on a local port.
- `serve(listen, scenario_path, state_dir)`: the `xcloudd simulator` command.
- `Fault`/`FaultAction`: fault rules, added with `sim.faults.add(Fault(...))`.
- `Scenario`, `default_scenario()`, `load_scenario(path)`: the simulated world.

Admin API (no auth; local tool, deliberately outside /v1):
GET /_sim/info, GET /_sim/runs[?workflow_id=], POST /_sim/runs {"workflow_id",
"git_reference_id"?, "pull_request_id"?, "start_reason"?, "outcome"?}, GET|POST|DELETE
/_sim/faults (POST body: Fault fields), GET /_sim/traffic?since=N.
"""

from xcloudd.simulator.apierror import ApiError
from xcloudd.simulator.auth import ApiKey, generate_key, load_or_create_key, mint_token
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.faults import Fault, FaultAction
from xcloudd.simulator.runs import BuildRun
from xcloudd.simulator.scenario import (
    Scenario,
    Workflow,
    default_scenario,
    load_scenario,
    scenario_from_dict,
)
from xcloudd.simulator.server import RunningSimulator, running_simulator, serve, write_client_files
from xcloudd.simulator.traffic import TrafficEntry

__all__ = [
    "ApiError",
    "ApiKey",
    "BuildRun",
    "Fault",
    "FaultAction",
    "RunningSimulator",
    "Scenario",
    "Simulator",
    "TrafficEntry",
    "Workflow",
    "default_scenario",
    "generate_key",
    "load_or_create_key",
    "load_scenario",
    "mint_token",
    "running_simulator",
    "scenario_from_dict",
    "serve",
    "write_client_files",
]
