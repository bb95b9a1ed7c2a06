"""nitp-ds: pretrain Mixture-of-Experts language models with DeepSpeed and the NITP objective."""

__version__ = "0.1.0"

from nitp_ds.errors import NITPError  # noqa: E402

__all__ = ["NITPError", "__version__"]
