"""Jobs that run on the Ray cluster (training, batch generation) and their configs."""
