"""The balancer role: accepting jobs and binding them to servers.

`role` is the process part (answers `comfy.submit`, takes the lease of gateway/bus/lease.py,
runs the dispatcher); `submit` accepts a job; `dispatcher` and the modules it is made of
keep the job records and bind jobs; `placement` decides where; `servers` and `fleet` know the
servers from their heartbeats and the registry.
"""
