"""The `python -m evaluate` binary (see __main__.py); a package so `pip install .` installs it."""
