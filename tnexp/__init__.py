__version__ = "0.1.0"

from tnexp import config as _config  # noqa: F401  (registers the OmegaConf resolvers)
