"""What the entry points call: train(cfg), evaluate(cfg) and the Hydra sweep machinery."""
