"""The `nitp` command-line interface (installed as `nitp_ds.cli`)."""
