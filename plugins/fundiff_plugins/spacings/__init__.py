"""Built-in fundiff plugins: one design per module, one entry point per module."""
