"""Data: the LLMTIME codec, HDF5 trajectories, the simulator and the LightningDataModule."""
