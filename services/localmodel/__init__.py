"""The small local policy model: built once from a registry package, loaded offline."""
