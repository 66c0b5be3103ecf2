"""The `isorun` command line."""
