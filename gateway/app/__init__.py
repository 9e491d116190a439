"""The command line and the composition of processes: the only part of gateway/ that imports
plugins/ (it starts adapters and simulators inside `comfyautomate up`).
"""
