"""What users run: the pipeline behind the CLI and API, the benchmark and its report, export, serve, demo."""
