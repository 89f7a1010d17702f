"""lipvae's Lightning glue, all of it here: the LightningModule and its optimiser (``module``), the
training callbacks (``callbacks``: checkpoints, stops, the fine-tune phase, the epoch log), the
CSV logger (``loggers``) and the margin callbacks for Trainers of the user's (``margins``).
Nothing else in lipvae subclasses a Lightning class but the data modules (``lipvae.data``,
``lipvae.datamodules``). Import the submodules; this package imports nothing itself."""
