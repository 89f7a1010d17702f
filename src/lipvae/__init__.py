"""lipvae: certifiably robust variational autoencoders (Barrett et al., AISTATS 2022)."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def short_number(value):
    """A number as a run's name shows it: as written where that is short (``5.0``, ``0.25``), to 6
    significant digits where a sweeper proposed a long one (``7.4881350392732475`` → ``7.48814``)."""
    if isinstance(value, float) and len(repr(value)) > 8:
        return f"{value:.6g}"
    return value


# ``${lipvae.short:${enc_L}}`` in the configs (the default run name), registered wherever lipvae is imported
OmegaConf.register_new_resolver("lipvae.short", short_number, replace=True)
