"""Webdataset pipelines for image, video and audio training data."""
