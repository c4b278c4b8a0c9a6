"""The `python -m data_pipeline` binary (see __main__.py); a package so `pip install .` installs it."""
