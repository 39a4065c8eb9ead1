"""The milter protocol (version 6, as Postfix and Sendmail speak it), on its own: the packet
codec (codec.py), listen addresses (address.py), the asyncio server that frames, negotiates
and answers for a per-connection handler (server.py), and the MTA's side (client.py). It
imports nothing else of dkim_sidecar and knows nothing of DKIM, config or metrics
(tests/unit/test_architecture.py checks it)."""
