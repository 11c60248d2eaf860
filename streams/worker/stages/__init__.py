"""The stages of the worker's batch step, in the order `streams.worker.batch.Pipeline.process` runs them:
`plan` (at-least-once), `route`, `devices`, `persons` (with `changes`, the identity change log, watching its
index), `commit`. Each reads and writes the batch's `Run`."""
