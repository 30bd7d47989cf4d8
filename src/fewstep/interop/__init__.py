"""diffusers interop: a diffusers model in as a teacher, students and OLSS schedulers out.

This package and ``fewstep.peers`` are the only places that import diffusers (an optional extra:
the core pipeline runs without it). Submodules import diffusers lazily, inside functions, so
importing ``fewstep.interop`` itself never needs it.
"""
