"""Task modules: preprocessing, collators and metrics, one module per task."""
