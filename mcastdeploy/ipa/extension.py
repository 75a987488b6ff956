"""The agent extension IPA loads from the ``ironic_python_agent.extensions`` entry point
(as ``mcastdeploy``): ``mcastdeploy.status`` says how the receive is going.

IPA runs one command at a time, so the command answers while no other runs: during early
start (the receive runs in the background while the agent waits for its deploy steps)
and after.  While the deploy step itself waits, progress goes to the agent's log.
"""

from __future__ import annotations

from ironic_python_agent.extensions import base

from mcastdeploy.ipa.job import current_job


class MulticastExtension(base.BaseAgentExtension):
    @base.sync_command("status")
    def status(self) -> dict:
        """state, blocks_done/blocks_total, bytes, rate_mb_s, eta_s, device, session_id."""
        job = current_job()
        return job.status() if job is not None else {"state": "idle"}
