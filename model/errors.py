class ModelError(Exception):
    """A model-side failure with a message meant for people (bad bundle, bad image, bad data)."""


class ImageDecodeError(ModelError):
    """An image could not be decoded; ``key`` names the study or isic_id it belongs to."""

    def __init__(self, key, reason):
        self.key = key
        self.reason = reason
        super().__init__(f"image {key!s}: {reason}")


class BundleError(ModelError):
    """A model bundle is missing, tampered with, or does not match what the caller expects."""


class MissingExtra(RuntimeError):
    """A feature needs an optional extra that this install lacks; the message says which."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, found without importing it (a package that cannot
    even be looked up counts as missing)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(module: str, extra: str, purpose: str, distribution: str = "dermascan") -> None:
    """Raise :class:`MissingExtra` — one line naming the extra to install — when ``module`` is
    not installed. Call it before importing an optional extra's package."""
    if not installed(module):
        raise MissingExtra(
            f"{purpose} needs the '{extra}' extra ({module} is not installed): pip install '{distribution}[{extra}]'"
        )
