"""Meshes, the logical-axis sharding rules, and multi-host helpers."""
