"""Joint learning of the DeepSC model: phantoms, datasets, losses, trainer and metrics."""
