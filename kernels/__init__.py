"""moeplex kernels package."""
