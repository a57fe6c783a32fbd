"""emugate gateway: one TOML file starts vLLM backends (real or emulated) behind one OpenAI endpoint."""
