"""A local App Store Connect stand-in (Xcode Cloud endpoints) for the demo, tests and benchmarks.

Public API:

- `Simulator(scenario, clock, rate_limit, keys, traffic_limit, *, seed)`: the state (world, keys,
  runs, faults, seeded random generator, traffic) and `app()`, the aiohttp application serving
  Apple's paths plus the `/_sim/` admin API. `seed` defaults to the scenario's (0).
- `running_simulator(...)`: async context manager serving one on a local port.
- `serve(listen, scenario_path, state_dir=None)`: the `xcloudd simulator` command. It prints a
  banner (the URL on the line with "stand-in at ", each workflow with its outcomes, where the
  key and a ready client config are) and ends normally on SIGTERM or SIGINT (exit 0).
  `state_dir=None` is `default_state_dir()`: $XDG_STATE_HOME/xcloudd-simulator, else
  ~/.local/state/xcloudd-simulator; never the working directory, since it holds a private key.
- Workflow descriptions as served name the outcome ("Always fails (simulator: always FAILED)"),
  so any client's listing of workflows says which gives which result.
- `Fault`/`FaultAction`/`MalformedVariant`: fault rules, added with `sim.faults.add(Fault(...))`
  (see faults.py for what each action does).
- `Scenario`, `default_scenario()`, `load_scenario(path)`: the simulated world.

Admin API (no auth; local tool, deliberately outside /v1):

- GET /_sim/info: base URL, key ids, rate limit, clock time, seed, and the workflows with their
  outcomes.
- GET /_sim/runs[?workflow_id=]; POST /_sim/runs {"workflow_id", "git_reference_id"?,
  "pull_request_id"?, "start_reason"?, "outcome"?}: ground truth, builds behind the client's back.
- POST /_sim/faults with the Fault fields as JSON (all optional; defaults shown):
  {"action": "status", "method": "*", "path": ".*", "times": 1 (null: always), "status": 503,
  "code": null, "body": null, "retry_after": null, "probability": 1.0}, plus per action
  "variant" (malformed, required), "delay" (hang, hang_after_create: 60.0 seconds),
  "then_drop" (hang: false), "size" (oversize: 100000000 bytes). A bad rule is a 400
  {"error": "bad fault rule: ..."}. GET lists the active rules with "remaining"; DELETE clears.
- POST /_sim/seed {"seed": N}: restart the random sequence behind fault probabilities.
- GET /_sim/traffic?since=N: requests and answers, with the fault (action and rule) applied.
- POST /_sim/webhooks {"url", "delay_s"? (0), "loss"? (0..1, 0), "seed"? (the simulator's)}:
  POST Xcode Cloud's webhook payloads (BUILD_CREATED, BUILD_STARTED, BUILD_COMPLETED) for
  every run to `url`, `delay_s` of the simulator's clock after each transition, losing a
  seeded fraction `loss`; it restarts with the records cleared. GET reports {"webhooks":
  {"active", "target" (the URL's origin only), "delay_s", "loss", "seed", "pending", "sent":
  [...], "lost": [...], "failed"}}, each record with event_type, run_id, workflow_id,
  product_id, at, due, time (and status, error when sent). DELETE stops (see webhooks.py).
"""

from xcloudd.simulator.apierror import ApiError
from xcloudd.simulator.auth import ApiKey, generate_key, load_or_create_key, mint_token
from xcloudd.simulator.core import Simulator
from xcloudd.simulator.faults import Fault, FaultAction, MalformedVariant
from xcloudd.simulator.runs import BuildRun
from xcloudd.simulator.scenario import (
    Scenario,
    Workflow,
    default_scenario,
    load_scenario,
    scenario_from_dict,
)
from xcloudd.simulator.server import (
    RunningSimulator,
    default_state_dir,
    running_simulator,
    serve,
    write_client_files,
)
from xcloudd.simulator.traffic import TrafficEntry

__all__ = [
    "ApiError",
    "ApiKey",
    "BuildRun",
    "Fault",
    "FaultAction",
    "MalformedVariant",
    "RunningSimulator",
    "Scenario",
    "Simulator",
    "TrafficEntry",
    "Workflow",
    "default_scenario",
    "default_state_dir",
    "generate_key",
    "load_or_create_key",
    "load_scenario",
    "mint_token",
    "running_simulator",
    "scenario_from_dict",
    "serve",
    "write_client_files",
]
