"""Tiny MoE checkpoints built locally, for tests, benchmarks and the demo.

Each specimen is a normal Hugging Face checkpoint directory (config, safetensors,
tokenizer) that both vLLM and transformers load, so the code path is the one users
take with their own models.
"""

from capture_server.specimens.build import ARCHITECTURES, build_specimen

__all__ = ["ARCHITECTURES", "build_specimen"]
