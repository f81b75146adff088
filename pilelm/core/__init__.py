"""Configuration, manifests, the stage table, the pipeline runner, the report and the CLI."""
