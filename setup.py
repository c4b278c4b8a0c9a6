"""A shim so tools that want a setup.py find one: Beam's stager (`--beam_pipeline_options=...,setup_file=./setup.py`)
and `python setup.py sdist`. Everything about the package lives in setup.cfg (and pyproject.toml's build system)."""

import setuptools

setuptools.setup()
