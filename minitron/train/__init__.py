"""The one training loop, its schedule, checkpoints, tracking and the training job."""
