"""The `python -m train` binary (see __main__.py); a package so `pip install .` installs it."""
