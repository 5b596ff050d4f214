"""Grad-CAM overlays and concept read-outs for trained checkpoints (`kdcli explain`)."""
