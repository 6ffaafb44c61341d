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
