"""The jailer subcommands that are neither the run hot path nor one concern's own module."""
