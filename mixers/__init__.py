"""mixers package."""
