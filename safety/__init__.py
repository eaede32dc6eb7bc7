"""The safety supervisor ("safety cerebellum"): tensorised safety rules beside a small learned risk scorer.

`SafetySupervisor` passes the control module's command through bit for bit when the scene is clear
and every health flag is up, and only ever makes it more conservative otherwise (stopping envelope
``v t_react + v²/(2 a) + margin`` on the steered path, compute/hardware/algorithm flags, a gated
learned risk scorer); a NaN, ±Inf or out-of-range input is an input fault that fails safe.
`sector_distances` (or the traceable `SectorDistances`) turns lidar points into its per-sector
input; `fxopt.safety.scenarios` generates seeded inputs and collision labels;
`fxopt.safety.verify` checks the ONNX lowering against torch and writes a manifest;
`fxopt.safety.properties` is the supervisor's compile-time property suite and
`fxopt.safety.policy` the strict compile policy for safety models.
"""

from fxopt.safety.supervisor import (
    INTERVENTION_BITS,
    SafetySupervisor,
    SectorDistances,
    SupervisorConfig,
    decode_intervention,
    sector_distances,
    stopping_distance,
)

__all__ = [
    "INTERVENTION_BITS", "SafetySupervisor", "SectorDistances", "SupervisorConfig", "decode_intervention",
    "sector_distances", "stopping_distance",
]

from fxopt.extensions import register_extension  # noqa: E402 - after the public names it registers
from fxopt.safety.policy import StrictPolicy  # noqa: E402

register_extension("safety_policy", "strict", StrictPolicy)
