"""The model: config and presets, layers, InternViT, the adapter, the Qwen2 decoder, the whole VLM."""
