"""nanoGPT (Shakespeare setting), at its published path."""
