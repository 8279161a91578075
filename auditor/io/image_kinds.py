"""Which files are images: the one test that image folders, archives and label files share."""

from __future__ import annotations

__all__ = ["IMAGE_EXTENSIONS", "is_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def is_image(name: str) -> bool:
    """Whether the file name ``name`` (no folder) is an image: a known extension, not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
