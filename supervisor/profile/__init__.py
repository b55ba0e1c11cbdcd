"""Stage 1, the profile: a TOML file read into a validated :class:`~supervisor.profile.schema.Profile`.

``schema`` (pydantic models), ``load`` (files, ``extends``, ``--set``, ``--model``), ``rules``
(cross-field checks that collect every error) and ``lmcache`` (LMCache's own keys and how it reads
their values). Pure apart from reading the profile files. May import: errors, redact, paths.
"""
