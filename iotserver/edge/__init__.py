"""The connection edge shared by every listener: endpoint strings, limits, timeouts, listening.

- ``endpoint``: the one parser of listening addresses into a typed ``Endpoint``;
- ``limits``: per-listener limits and timeouts, their config keys, defaults and counters;
- ``guard``: the wrapping factory and protocol that enforce them;
- ``listen``: listening with one-line startup errors, TLS reload, warnings, a safe stop.
"""
