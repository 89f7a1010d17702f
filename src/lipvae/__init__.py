"""lipvae: certifiably robust variational autoencoders (Barrett et al., AISTATS 2022)."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The configs moved from src/lipvae/conf/ to conf/ at the top of the repository (still shipped as
# lipvae.conf). A clone updated across that move may keep src/lipvae/conf/__pycache__, which would
# shadow the real configs as an empty namespace package: say so instead of failing obscurely.
_stale = _Path(__file__).with_name("conf")
if _stale.is_dir() and not (_stale / "config.yaml").is_file():
    raise ImportError(f"{_stale} is left over from before lipvae's configs moved to conf/ at the top of the"
                      f" repository; delete it: rm -r {_stale}")
