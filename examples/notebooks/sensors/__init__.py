"""A small project package, as a notebook's neighbour: the model and the data loading it uses."""

from .data import load_readings
from .model import build_model

__all__ = ["build_model", "load_readings"]
