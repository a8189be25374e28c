"""The CUDA backend: ``spec`` (rules, defaults) and ``launch`` (render, NVRTC build, run)."""
