"""lipvae: certifiably robust variational autoencoders (Barrett et al., AISTATS 2022)."""

__version__ = "0.1.0"
