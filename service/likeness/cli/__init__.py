"""The ``likeness`` command line."""
