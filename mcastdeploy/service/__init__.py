"""The rack-head daemon (``mcastdeploy serve``): sessions on demand, many at once.

- ``config.py``: the daemon's INI file and its command-line overrides.
- ``groups.py``: which multicast group a new session gets (policy, no I/O).
- ``rateshare.py``: how the rate budget is split between sessions (policy, no I/O).
- ``table.py``: the persisted session table, so a restarted daemon resumes its sessions.
- ``session.py``: one session's work in its own thread: the image into the cache, then a
  Sender on a socket, with its rate changeable and its receivers readable from outside.
- ``daemon.py``: turns "agent wants image X" into sessions, shares the rate, survives a
  session's failure.
- ``api.py``: the authenticated HTTP JSON API, status and Prometheus metrics.
- ``client.py``: what ``session new --rack-head`` and ``status`` use to talk to it.
- ``events.py``: structured logs, one line per event, session id on each.
"""
