"""The ``genfleet`` command line: ``cluster.cli.main`` builds it from one module per group
of commands, which share ``cluster.cli.common``."""
