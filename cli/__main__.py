"""`python -m nitp_ds.cli ...`: the form the `deepspeed` launcher runs on every rank."""

from nitp_ds.cli.main import main

main()
