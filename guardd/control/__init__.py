"""guardd's control socket: the wire protocol, the daemon's server and guardctl's client.

Nothing is imported here on purpose: guardctl imports `protocol` and `client`, which use
only the standard library, and must not pay for the server's anyio machinery.
"""
