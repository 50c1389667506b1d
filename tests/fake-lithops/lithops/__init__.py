"""Fake Lithops for lithops-hpc tests only (see tests/fake-lithops/README.md).

Provides just the API surface runtime-defs/handler.py uses.  Never install it
in a real runtime.
"""
from lithops.version import __version__

FAKE = True

__all__ = ['__version__']
