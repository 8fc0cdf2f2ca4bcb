"""edgead: visual anomaly detection from the workstation to NVIDIA edge GPUs.

This module stays torch-free: ``edgead.runtime`` (the device side) imports it.
"""
__version__ = "0.1.0"
