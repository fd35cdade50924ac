"""``python -m lit_sae ...``: the same as the ``lit-sae`` console script, for environments where the package is on
``PYTHONPATH`` but not installed (e.g. a bare GPU image)."""

from lit_sae.cli.main import main

if __name__ == "__main__":
    main()
