"""Captioning engines behind one protocol; the pipeline never knows which one runs."""
