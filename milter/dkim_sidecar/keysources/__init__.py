"""Where signing keys come from, behind one small interface (local.KeySource): a key
directory and a table in the config (local.py), Mailcow's Redis (mailcow.py) with its
forwarding hosts (forwarding.py); the frozen specs the config describes them by (specs.py);
the bounded reading of key and password files (files.py). runtime.py asks each source and
combines what they hold into one KeySet."""
