"""Model: loading (Qwen, SmolLM2 GGUF, tiny Qwen2), LoRA and the LightningModule."""
