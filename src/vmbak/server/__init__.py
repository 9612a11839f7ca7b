"""vmbak as a service: configuration, scheduler, job runner, history, HTTP API, metrics and
notifications. Thin like cli/: it calls the library (or the command line, for a job's
work) and never reaches below it. See docs/server.md."""
