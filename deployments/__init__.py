"""moeplex deployments package."""
