"""Training: datasets on the model grid, preference sampling, resumable training entry points."""
