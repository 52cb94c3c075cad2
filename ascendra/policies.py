"""Build a coordinator policy by name.

It sits above ``router`` (the interface and the baselines) and ``predictor`` (Ascendra's
policy), so neither imports the other's caller.
"""

from __future__ import annotations

from ascendra.predictor import AscendraPolicy
from ascendra.router import InstanceSpec, Policy, RoundRobinPolicy


def make_policy(policy: str, specs: list[InstanceSpec], **ascendra_options) -> Policy:
    """``vllm``/``sarathi``: round robin over mixed instances; ``ascendra``: predict and escalate
    (``ascendra_options`` go to ``AscendraPolicy``)."""
    if policy in ("vllm", "sarathi"):
        return RoundRobinPolicy(specs, name=policy)
    if policy == "ascendra":
        return AscendraPolicy(specs, **ascendra_options)
    raise ValueError(f"unknown policy {policy!r}")


__all__ = ["make_policy"]
