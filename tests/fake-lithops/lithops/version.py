# Major.minor must match the Lithops pinned in runtime-defs/lithops-default.def.
__version__ = "3.7.0+fake"
