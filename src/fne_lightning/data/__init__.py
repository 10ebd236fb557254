"""The data pipeline: annotations and datasets, caption cleaning, image transforms, training order,
the built-in synthetic benchmark. Plain PyTorch; the LightningDataModule is ``datamodule.py``."""
