"""Checkpoints: config.json reader, key map, safetensors I/O, transformers format, our parameter store, converters, load_pretrained."""
