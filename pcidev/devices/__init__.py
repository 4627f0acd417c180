"""Device models that ship with the framework (examples and test devices)."""
