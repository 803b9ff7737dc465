"""The train stage: checkpoints now; the trainer loop, optimizers and schedules build on them."""
