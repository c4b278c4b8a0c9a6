"""The `python -m predict` binary (see __main__.py); a package so `pip install .` installs it."""
