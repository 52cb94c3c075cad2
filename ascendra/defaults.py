"""What a server started without --policy runs: Ascendra's own scheduling whenever it can.

Ascendra's policy needs at least two instances (low-priority ones and a high-priority one to
escalate to). With one instance the best choice is Sarathi-style chunked prefill: a long
prompt is split into chunks, so running requests keep producing tokens while it is
prefilled (vLLM's policy stalls them for the whole prefill, which is what TBT objectives
punish first).
"""

from __future__ import annotations

SINGLE_INSTANCE_POLICY = "sarathi"


def default_policy(num_instances: int) -> str:
    return "ascendra" if num_instances >= 2 else SINGLE_INSTANCE_POLICY


def policy_note(policy: str | None, num_instances: int) -> tuple[str, str]:
    """(the policy to run, why), for the start-up log."""
    if policy is not None:
        return policy, "--policy"
    chosen = default_policy(num_instances)
    if chosen == "ascendra":
        return chosen, f"default for {num_instances} instances: LP/HP instances with SLO-aware escalation"
    return chosen, ("default for 1 instance (ascendra needs >= 2: pass --num-instances 2 "
                    "on a machine with the cores)")
