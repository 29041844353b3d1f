"""RL objectives and the Selective Sample Buffer: pure, jit-able functions of arrays."""
