"""device and pair state."""
