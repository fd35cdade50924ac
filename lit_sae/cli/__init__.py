"""The ``lit-sae`` command line: ``main`` (dispatch), ``trainer`` (LightningCLI for fit / validate / test), ``check``
(the same parser on signatures read from the source, so a bad key fails before torch loads), ``messages``
(jsonargparse's errors as one line), ``commands`` (the command table), ``errors`` (the error type), ``console``
(quiet third-party output) and the plain-function commands (``export_command``; harvest, features and reproduce
live with their job).
"""


def main() -> None:
    """The ``lit-sae`` console script (see :mod:`lit_sae.cli.main`)."""
    from lit_sae.cli.main import main as run

    run()
