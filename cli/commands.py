"""Imports every command module so that each registers its commands on the app."""
from nitp_ds.cli import train  # noqa: F401
from nitp_ds.cli import data  # noqa: F401
from nitp_ds.cli import checkpoint  # noqa: F401
from nitp_ds.cli import evaluate  # noqa: F401
from nitp_ds.cli import demo  # noqa: F401
