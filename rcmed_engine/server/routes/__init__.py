"""One APIRouter per resource of API v1; app.py includes them in this order (the OpenAPI document's order)."""

from __future__ import annotations

from . import classes, health, images, info, jobs, refine, segment

__all__ = ["classes", "health", "images", "info", "jobs", "refine", "segment"]
