"""moeplex adapter_store package."""
