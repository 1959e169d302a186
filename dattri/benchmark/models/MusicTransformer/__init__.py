"""Music Transformer (MAESTRO setting), at its published path."""
