"""OPC UA: the server over the tag store (asyncua) and the southbound OPC UA client source.

See docs/opcua.md. Modules: ``config`` (``[opcua]``), ``service`` (lifecycle), ``security``,
``addrspace``, ``values`` + ``monitoring`` (subscriptions), ``session`` (read/write/history
routing), ``history`` + ``aggregates``, ``fastenc`` + ``uaserver`` (publish encoding),
``status`` (server object, methods), ``client`` (southbound source).
"""
