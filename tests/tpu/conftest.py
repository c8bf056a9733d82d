"""The TPU suite runs on XLA's CPU client unless a TPU is present (PJRT_DEVICE set first)."""
import os

if not os.path.exists("/dev/accel0"):
    os.environ.setdefault("PJRT_DEVICE", "CPU")
