"""The one exception type that nitp-ds raises for bad input.

Every message names the bad value and says how to fix it. The CLI prints it as one
line and exits with code 2; library users can catch it like any other exception.
"""


class NITPError(Exception):
    """Bad input (config, data, checkpoint or CLI argument), with a message naming the fix."""

    exit_code = 2
