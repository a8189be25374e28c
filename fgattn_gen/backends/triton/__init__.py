"""The Triton backend: ``spec`` (rules, defaults) and ``launch`` (render, import, run)."""
