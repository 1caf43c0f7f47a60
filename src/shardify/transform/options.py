"""What `convert --crop/--resize/--format/--quality` asked for, as one immutable value."""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("keep", "jpeg", "png", "webp")
CROPS = ("outline",)
EXT_OF_FORMAT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
DEFAULT_MARGIN = 16
DEFAULT_QUALITY = 95


@dataclass(frozen=True)
class TransformOptions:
    """None of crop, resize and a forced format: the shards hold the sources' bytes as they are.

    `quality` None means the format's default: JPEG 95, WebP lossless.
    """

    crop: str | None = None
    crop_margin: int = DEFAULT_MARGIN
    resize: int | None = None
    format: str = "keep"
    quality: int | None = None

    @property
    def active(self) -> bool:
        return self.crop is not None or self.resize is not None or self.format != "keep" \
            or self.quality is not None

    def output_ext(self, source_ext: str) -> str:
        """The image member's extension in the shard for a source image of `source_ext`."""
        return EXT_OF_FORMAT.get(self.format, source_ext) if self.active else source_ext

    def shaping(self) -> dict:
        """What decides the written bytes, for the run fingerprint: the options and the image
        library's version (another Pillow may encode other bytes). Empty when inactive, so a
        run without transforms fingerprints as before they existed."""
        if not self.active:
            return {}
        return {"transform": {"crop": self.crop, "crop_margin": self.crop_margin,
                              "resize": self.resize, "format": self.format,
                              "quality": self.quality, "library": library_version()}}


def library_version() -> str:
    """The image library that decodes and encodes: part of a run's identity."""
    import PIL  # only runs that transform need it

    return f"pillow {PIL.__version__}"
