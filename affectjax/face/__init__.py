"""Faces in video frames: MTCNN detection with five landmarks (JAX/Flax), alignment, tracking."""
