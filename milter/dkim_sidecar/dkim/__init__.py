"""The DKIM core (RFC 6376, RFC 8463): canonicalization, header fields, keys and names, the
signer. Pure functions over bytes; it imports nothing else of dkim_sidecar, no I/O but what a
caller hands it, no asyncio, redis or yaml (tests/unit/test_architecture.py checks it)."""
