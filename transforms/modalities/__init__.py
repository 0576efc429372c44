"""Modality plug-ins: text, image and video, registered in transforms/registry.py."""
