"""Command-line entry points: the mta daemon and mtactl."""
