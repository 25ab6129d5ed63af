"""OPC UA: the server over the tag store and the southbound OPC UA client source.

See docs/opcua.md and docs/architecture.md. Modules: ``config`` (``[opcua]``), ``service``
(lifecycle), ``layer`` + ``channel`` + ``dispatch`` + ``sessions`` + ``sessionsvc`` +
``subscriptions`` + ``subsvc`` (our session layer), ``security``, ``addrspace`` + ``nodecache``,
``values`` + ``monitoring`` (monitored items), ``session`` (read/write/history routing),
``history`` + ``aggregates``, ``fastenc`` (publish encoding), ``uaserver`` (asyncua's Server as
the address space and endpoint holder), ``compat`` (the only private asyncua use), ``status``
(server object, methods), ``client`` (southbound source).
"""
