"""dkim-sidecar: a DKIM-signing milter for the mail that Mailcow's rspamd leaves unsigned."""

__version__ = "0.1.0"
