"""moeplex engine package."""
