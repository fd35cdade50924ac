"""The ``lit-sae`` commands that are plain functions (``jsonargparse.CLI`` builds their options): one module each.

``harvest`` is ``lit_sae.data.harvest.run_harvest`` itself; ``export`` is here (``lit_sae.commands.export``).
Each module imports its heavy dependencies inside the function, so listing the commands stays fast.
"""

from lit_sae.commands.export import export

__all__ = ["export"]
