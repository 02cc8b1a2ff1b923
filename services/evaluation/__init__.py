"""Sample-quality measurement: classifier feature space, Fréchet distance, grids."""
