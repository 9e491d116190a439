"""The bus: what every role speaks and how it reaches NATS.

`contract` holds every message, subject and record (one module that every role imports);
`jobstate` the transitions of a job's record; `connection` connecting and creating the JetStream
resources; `events` publishing a job's events; `natsserver` the embedded broker; `kvsnapshot`
reading a whole KV bucket; `lease` one holder of a role at a time (the dispatching balancer,
the log sink); `process` running one role as a process.
"""
