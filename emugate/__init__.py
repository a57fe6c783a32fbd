"""emugate's top layer: the ``emugate`` command and the workflows that start servers and drive load.

Layers (README, Layout; enforced by import-linter contracts in pyproject.toml):
``emugate`` (this package: CLI, capture, validate) imports ``gateway``,
``loadtests`` and ``emu_executor``, which import only ``profiles``, the
bottom layer (profile format, oracle, build, conversion, bundled assets).
"""
