"""Networks (MONAI/torch): dose prior (VQ-VAE), preference model (FiLM), and their model cards.
torch and MONAI are optional dependencies of the core: import this package only where a model is needed."""
