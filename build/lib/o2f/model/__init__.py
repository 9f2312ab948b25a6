"""Backbone, FPN neck, O2F head and the detector that joins them."""

from o2f.model.detector import O2F, build_model

__all__ = ["O2F", "build_model"]
