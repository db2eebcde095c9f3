"""Egress policy: the model, the YAML loader and its validation, the compiled engine, explain.

Pure (no I/O beyond reading policy files in the loader). The public names are re-exported here.
"""

from proxy.core.policy.engine import Decider, Decision, Engine, Outcome, Step, Verdict
from proxy.core.policy.explain import decision_as_dict, render_explanation
from proxy.core.policy.loader import load_paths, load_text, policy_files
from proxy.core.policy.model import (
    DEFAULT_PORTS,
    DEFAULT_PRIORITY,
    DLP_DETECTORS,
    Action,
    Destination,
    Inspect,
    Mode,
    Origin,
    Policy,
    PolicyKind,
    PortRange,
    Rule,
    Subject,
    Tier,
    TunnelProtocol,
)

__all__ = [
    "DEFAULT_PORTS",
    "DEFAULT_PRIORITY",
    "DLP_DETECTORS",
    "Action",
    "Decider",
    "Decision",
    "Destination",
    "Engine",
    "Inspect",
    "Mode",
    "Origin",
    "Outcome",
    "Policy",
    "PolicyKind",
    "PortRange",
    "Rule",
    "Step",
    "Subject",
    "Tier",
    "TunnelProtocol",
    "Verdict",
    "decision_as_dict",
    "load_paths",
    "load_text",
    "policy_files",
    "render_explanation",
]
