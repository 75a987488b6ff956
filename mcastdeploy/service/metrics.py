"""The daemon's figures in the Prometheus text exposition format (version 0.0.4), since
that is what operators scrape: sessions by state, bytes multicast, repairs, bytes pulled
from the image stores, agents by state, and each live session's rate."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from mcastdeploy.service.daemon import Totals

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SESSION_STATES = ("fetching", "waiting", "sending", "repairing", "finished")
AGENT_STATES = ("asked", "joining", "receiving", "verifying", "done", "failed")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(totals: Totals, sessions: list[dict], budget_bps: int) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float)
                         else f"{name}{labels} {value}")

    states = Counter(view["state"] for view in sessions)
    metric("mcastdeploy_sessions", "gauge", "Sessions in flight, by state.",
           [(f'{{state="{state}"}}', states.get(state, 0))
            for state in sorted(set(SESSION_STATES) | set(states))])
    metric("mcastdeploy_sessions_ended_total", "counter",
           "Sessions ended since the daemon started, by result.",
           [('{result="done"}', totals.sessions_done),
            ('{result="failed"}', totals.sessions_failed)])
    live = lambda key: sum(view[key] for view in sessions)  # noqa: E731
    metric("mcastdeploy_multicast_bytes_total", "counter",
           "Bytes multicast (data, repair and control), all sessions.",
           [("", totals.bytes_multicast + live("bytes_sent"))])
    metric("mcastdeploy_repairs_asked_total", "counter",
           "Repair symbols agents asked for, all sessions.",
           [("", totals.repairs_asked + live("repairs_asked"))])
    metric("mcastdeploy_repairs_sent_total", "counter",
           "Repair symbols multicast, all sessions.",
           [("", totals.repairs_sent + live("repairs_sent"))])
    metric("mcastdeploy_source_bytes_total", "counter",
           "Bytes pulled from image stores (Swift, HTTP) into the cache.",
           [("", totals.source_bytes + live("source_bytes"))])
    agents = Counter(agent["state"] for view in sessions for agent in view["agents"])
    metric("mcastdeploy_agents", "gauge", "Agents of the sessions in flight, by state.",
           [(f'{{state="{state}"}}', agents.get(state, 0))
            for state in sorted(set(AGENT_STATES) | set(agents))])
    metric("mcastdeploy_rate_budget_bps", "gauge",
           "The rate all sessions share, bits per second.", [("", budget_bps)])
    metric("mcastdeploy_session_rate_bps", "gauge",
           "Each session's rate now, bits per second.",
           [(f'{{session="{view["session_id"]}",image="{_label(view["image"])}"}}',
             view["rate_bps"]) for view in sessions])
    return "\n".join(lines) + "\n"
